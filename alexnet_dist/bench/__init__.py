"""Throughput benchmarks: ``python -m alexnet_dist.bench {data,model,train}``.

Every mode times steps after a warm-up, reports images/s, median and p95 step time,
the bytes one rank sends to its partner tower per image (counted by
:mod:`alexnet_dist.exchanges`), data-wait vs compute and peak memory per rank, and
with ``--baseline`` the same work done the usual way, measured in the same run.
"""
