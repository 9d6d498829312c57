"""Every registered method x each of its presets on the tokred tasks, against the unreduced baseline.

The tokred pytest plugin parametrizes ``tokred_case`` over the tasks (``--tokred-task``, default all) and, for
each, the baseline plus every method supporting the task's model family with each of its presets, so methods
installed through the ``tokred.methods`` entry point are benchmarked without edits here. Each benchmark's
``extra_info`` holds quality with intervals, the paired speedup against the baseline with its interval, FLOPs-ideal
speedup, efficiency, GFLOPs, peak memory, threads and contention, options, task, model, device, dtype and package
versions (results schema 2).

Run (embedded models, CPU)::

    pytest benchmarks/test_methods.py --benchmark-only --benchmark-json=results/pytest.json
    pytest benchmarks/test_methods.py --benchmark-only --tokred-task=vit_classification --tokred-methods=tome
    pytest benchmarks/test_methods.py --benchmark-only --tokred-size=arch --tokred-task=text_to_image
    pytest benchmarks/test_methods.py --benchmark-only --tokred-size=arch --tokred-task=text_to_image \
        --tokred-set architecture=sd15,sd3 --tokred-set resolution=512,1024 --tokred-presets=default
    tokred leaderboard results/pytest.json -o leaderboard/README.md
"""


def test_method(tokred_case, benchmark):
    info = tokred_case.run(benchmark)
    assert info["speedup"] > 0 and info["speedup_ci"][0] <= info["speedup"] <= info["speedup_ci"][1]
    if not getattr(tokred_case.task, "random_weights", False):  # random weights: speed only
        assert info["quality"], "the task reported no quality metric"
