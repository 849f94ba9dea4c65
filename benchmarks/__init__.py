"""kvlog's benchmark harness: ``python -m benchmarks`` (see ``benchmarks/__main__.py`` and the README).

One module a workload (``reads``, ``replay``, ``writes``, ``footprint``,
``embedded``, ``processes``), the shared measuring tools (``harness``), the data set
(``data``), the competitors that need a server or a loop of their own
(``redis_server``, ``ktables_bench``) and the report (``report``).
"""
