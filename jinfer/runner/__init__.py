"""Scheduled work -> bucketed device arrays -> compiled steps: buckets, the compile budget,
warm-up and memory sizing."""
