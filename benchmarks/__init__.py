"""The benchmarks: scripts run from the repository root as modules (``python -m benchmarks.matched_tome ...``), each
writing ``benchmarks/results/<name>.{json,md}``; see ``docs/benchmarks.md`` for what each measures.

The harness they share, imported by name (no ``sys.path`` edits):

* :mod:`benchmarks.common`: interleaved timing (``time_interleaved``, ``median``), the machine and its load
  (``environment``), the report writers (``write_report``, ``write_rows``, ``markdown_table``);
* :mod:`benchmarks.fmnist_pool`: the held-out Fashion-MNIST pools (``dev``, ``eval``, ...) drawn from the 60k
  training file, disjoint from each other and from the reference heads' images;
* :mod:`benchmarks.pareto`: loading a reference model (``load``), running it (``run``), paired standard errors
  (``paired_se``);
* :mod:`benchmarks.matched_tome`: matched-FLOP evaluation against official ToMe (``bracket``, ``evaluate``,
  ``stats``, ``load_inputs``, ``load_photos``).
"""
