"""The pieces of the issue-18 device check; ``benchmarks/device_check.py`` is its command line.

One module a job: :mod:`~device_parts.sizes` (how big), :mod:`~device_parts.report` (the rows
and the table), :mod:`~device_parts.environment` and :mod:`~device_parts.logged` (the machine
and the child commands), :mod:`~device_parts.context` (what every part gets),
:mod:`~device_parts.data` (the shard sets), one module per part (``tests_part``,
``resnet50_part`` with ``resnet50_extras``, ``sr_part``, ``paper_part``), and
:mod:`~device_parts.run` (one run, in order). Imported with ``benchmarks/`` on ``sys.path``, as
``gpu_throughput`` and ``sr_throughput`` are.
"""
