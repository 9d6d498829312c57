"""Every registered method x each of its presets on the tokred tasks, against the unreduced baseline.

The tokred pytest plugin parametrizes ``tokred_case`` over the tasks (``--tokred-task``, default all) and, for
each, the baseline plus every method supporting the task's model family with each of its presets, so methods
installed through the ``tokred.methods`` entry point are benchmarked without edits here. Each benchmark's
``extra_info`` holds quality, speedup against the baseline (interleaved in the same rounds), GFLOPs, peak memory,
options, task, model, device, dtype and package versions.

Run (embedded models, CPU)::

    pytest benchmarks/test_methods.py --benchmark-only --benchmark-json=results/pytest.json
    pytest benchmarks/test_methods.py --benchmark-only --tokred-task=vit_classification --tokred-methods=tome
    tokred leaderboard results/pytest.json -o leaderboard/README.md
"""


def test_method(tokred_case, benchmark):
    info = tokred_case.run(benchmark)
    assert info["speedup"] > 0
    assert info["quality"], "the task reported no quality metric"
