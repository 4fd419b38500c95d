"""Lookahead: the device calls of a step left in flight while the next step is planned and
dispatched, and the on-device gather that feeds their samples to the next call.

A decode row planned past a call in flight takes its input token from that call's samples,
which are not on the host yet: `device_tokens` gathers them on the device (`take_tokens`) from
`InFlight.tokens`, every call's last samples end to end, at the indices `InFlight.sample_index`
keeps per sequence. Some rows need the host before anything is planned past them
(`InFlight.must_read_back_first`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.engine.scheduler import ScheduledSequence


@dataclasses.dataclass
class DeviceCall:
    """One jitted call dispatched to the device and not yet read back."""

    items: list[ScheduledSequence]  # its rows in order: decodes, then prompt chunks
    num_decode: int                 # of those, decode rows
    num_steps: int                  # decode steps run back to back (1: one, maybe mixed, step)
    results: object                 # SamplerOutput on the device: fields [S], or [steps, S]
    last_tokens: object             # [R >= rows] on the device: each row's last sample
    stacked: bool = False           # results carry a leading steps axis (decode-steps program)
    prompt_scores: object = None    # SamplerOutput [P] on the device: prompt tokens scored, or
                                    # None (no chunk asks for prompt logprobs)


@dataclasses.dataclass
class InFlight:
    """A step's device calls (a prompt call and a decode call without mixed batching, else one),
    dispatched and not yet read back."""

    calls: list[DeviceCall]
    # seq_id -> where `tokens` holds the sequence's last sample, for each row that samples
    sample_index: dict[int, int] = dataclasses.field(init=False)

    def __post_init__(self):
        self.sample_index, offset = {}, 0
        for call in self.calls:
            for row, item in enumerate(call.items):
                if item.samples:
                    self.sample_index[item.seq.seq_id] = offset + row
            offset += call.last_tokens.shape[0]

    @functools.cached_property
    def tokens(self):
        """[sum of R] on the device: every call's last samples, end to end."""
        lasts = [call.last_tokens for call in self.calls]
        return lasts[0] if len(lasts) == 1 else jnp.concatenate(lasts)

    def must_read_back_first(self) -> bool:
        """Whether a live row of these calls that samples needs the host before the next step
        is planned: a row with penalties (the sampler reads every output token, and these are
        not on the host yet), or the first token of a request with n > 1 (its siblings fork
        from it on read-back)."""
        for call in self.calls:
            for item in call.items:
                seq, params = item.seq, item.seq.params
                if not item.samples or seq.is_finished:
                    continue
                if params.has_penalties or (params.n > 1 and seq.index == 0
                                            and not seq.num_output_tokens):
                    return True
        return False


@jax.jit
def take_tokens(host_tokens, tokens, sources):
    """host_tokens [rows] with each row whose source is >= 0 replaced by tokens[source]: input
    tokens gathered on the device from a call not yet read back. tokens [R], sources [rows]."""
    return jnp.where(sources >= 0, tokens[jnp.maximum(sources, 0)], host_tokens)


def device_tokens(decode: list[ScheduledSequence], step_input,
                  prev: Optional[InFlight]) -> Optional[jax.Array]:
    """The decode rows' input tokens [rows] on the device when some of them are samples of
    `prev`, not read back yet (gathered on the device); None when all are on the host.
    `step_input`: the call's StepInput, whose token_ids begin with the decode rows' host tokens
    (0 where the token is still on the device)."""
    if not decode:
        return None
    host = step_input.token_ids[:step_input.attention.decode.block_tables.shape[0]]
    sources = np.full(host.shape, -1, np.int32)  # [rows]: index into prev.tokens, or -1
    for row, item in enumerate(decode):
        if item.start >= item.seq.num_tokens:  # its input token is still on the device
            assert prev is not None, f"sequence {item.seq.seq_id} has no call in flight"
            sources[row] = prev.sample_index[item.seq.seq_id]
    if (sources < 0).all():
        return None
    return take_tokens(host, prev.tokens, sources)
