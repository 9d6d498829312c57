"""Re-run the bad and edge inputs that issue 10 lists (30 that ended badly), each through the regression test that
reproduces it as a user would (the CLI in a subprocess, or the API), and count the outcomes:

    clear error  -- refused before anything was written or changed, with a message naming the problem and the
                    valid choices (the test asserts the message, the exit status 2 and the untouched state)
    correct      -- the input is valid and now does the right thing (the test asserts the behaviour)
    traceback / silent wrong / hang / lost -- what each item did before; a failing or timed-out test counts as the
                    item's old outcome again

    python tests/probes/rerun_issue10.py          # from the repository root, in the dev venv (about 2 minutes)
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from tempfile import TemporaryDirectory

ROOT = Path(__file__).resolve().parents[2]

# (item, outcome before, outcome now if its tests pass, tests)
PROBES: list[tuple[str, str, str, list[str]]] = [
    ("run --out onto an existing JSON file", "lost", "clear error",
     ["tests/test_cli.py::test_existing_output_is_refused_before_setup",
      "tests/test_cli.py::test_force_replaces_the_file_and_keeps_a_backup",
      "tests/test_cli.py::test_force_keeps_the_old_file_when_nothing_finishes"]),
    ("two runs on one --out at once", "lost", "clear error", ["tests/test_cli.py::test_two_processes_on_one_output"]),
    ("SIGKILL during a write leaves .tmp files", "lost", "correct",
     ["tests/test_cli.py::test_killed_write_leaves_the_old_file_and_the_next_run_cleans_up"]),
    ("leaderboard -o leaves a .tmp file", "lost", "correct",
     ["tests/test_leaderboard.py::test_stale_temporary_files_are_removed"]),
    ("--resume with other --options / --set", "silent wrong", "correct",
     ["tests/test_cli.py::test_resume_matches_the_whole_case_identity",
      "tests/test_cli.py::test_resume_reruns_rows_without_a_case_identity"]),
    ("leaderboard mixes 3-step and 20-step runs", "silent wrong", "correct",
     ["tests/test_leaderboard.py::test_sections_split_by_settings"]),
    ("leaderboard accepts speedup -3", "silent wrong", "clear error",
     ["tests/test_leaderboard.py::test_validation_errors_name_the_field"]),
    ("leaderboard accepts fid -1e308", "silent wrong", "clear error",
     ["tests/test_leaderboard.py::test_validation_errors_name_the_field"]),
    ("leaderboard task_info / options_repr of the wrong type", "traceback", "clear error",
     ["tests/test_leaderboard.py::test_validation_errors_name_the_field",
      "tests/test_cli.py::test_leaderboard_bad_fields_are_one_line_errors"]),
    ("--set num_inference_steps=-3", "silent wrong", "clear error",
     ["tests/test_task_text_to_image.py::test_every_setting_is_checked_at_construction"]),
    ("num_inference_steps=0 / batch_size=0 / prompts=[] replaced by defaults", "silent wrong", "clear error",
     ["tests/test_task_text_to_image.py::test_every_setting_is_checked_at_construction",
      "tests/test_task_text_to_image.py::test_empty_prompts_file_is_an_error",
      "tests/test_task_vit.py::test_every_setting_is_checked_at_construction"]),
    ("remove(deepcopy) unpatches the original", "silent wrong", "correct",
     ["tests/test_lifecycle.py::test_deepcopy_of_a_patched_model_carries_an_independent_patch"]),
    ("a block replaced while patched stays patched", "silent wrong", "correct",
     ["tests/test_lifecycle.py::test_block_copied_in_while_patched_is_not_patched_after_remove"]),
    ("a user's forward wrapper added after apply is deleted", "silent wrong", "correct",
     ["tests/test_lifecycle.py::test_remove_leaves_a_user_wrapper_added_after_apply"]),
    ("with p: with p: exits early", "silent wrong", "clear error",
     ["tests/test_lifecycle.py::test_with_blocks_cannot_reenter_or_use_a_removed_patch"]),
    ("with removed_patch: does nothing", "silent wrong", "clear error",
     ["tests/test_lifecycle.py::test_with_blocks_cannot_reenter_or_use_a_removed_patch"]),
    ("pipe.scheduler swapped after apply", "silent wrong", "correct",
     ["tests/test_lifecycle.py::test_scheduler_swap_after_apply_still_resets_each_generation"]),
    ("apply(seed='abc')", "traceback", "clear error", ["tests/test_lifecycle.py::test_bad_seed_raises_at_apply"]),
    ("apply(seed=2**80)", "traceback", "clear error", ["tests/test_lifecycle.py::test_bad_seed_raises_at_apply"]),
    ("CA-ToMe on a meta-device model", "traceback", "clear error",
     ["tests/test_lifecycle.py::test_value_dependent_methods_refuse_meta_models_at_apply"]),
    ("compute_on=range(10**12)", "hang", "correct",
     ["tests/test_lifecycle.py::test_huge_compute_on_range_is_checked_without_enumerating"]),
    ("list_methods(None)", "traceback", "correct", ["tests/test_lifecycle.py::test_list_methods_patterns"]),
    ("leaderboard -o into a read-only or existing directory", "traceback", "clear error",
     ["tests/test_cli.py::test_leaderboard_output_that_cannot_be_written",
      "tests/test_cli.py::test_bench_checks_the_leaderboard_output_before_running"]),
    ("run --out that cannot be written fails after setup", "traceback", "clear error",
     ["tests/test_cli.py::test_unwritable_output_fails_before_setup"]),
    ("four threads' first tokred.apply", "silent wrong", "correct",
     ["tests/test_lifecycle.py::test_registry_loads_once_for_concurrent_first_use"]),
    ("ToMe ViT backward with gradient checkpointing", "traceback", "correct",
     ["tests/test_training.py::test_backward_with_gradient_checkpointing_equals_without"]),
    ("forward_intermediates after ToMe", "traceback", "clear error",
     ["tests/test_training.py::test_forward_intermediates_token_features_or_a_clear_error"]),
    ("cat_pruning with feed-forward chunking on tokens (U-Net)", "traceback", "correct",
     ["tests/test_training.py::test_cat_pruning_with_feed_forward_chunking_on_tokens"]),
    ("cat_pruning with at most t0 calls", "silent wrong", "clear error",
     ["tests/test_training.py::test_cat_warns_when_the_schedule_is_too_short_to_prune"]),
    ("parity tests skip silently without the references", "silent wrong", "clear error",
     ["tests/test_lifecycle.py::test_missing_parity_reference_fails_with_the_install_hint"]),
]


def node_outcomes(nodes: list[str], timeout: int) -> dict[str, str]:
    """pytest's outcome per test function (a parametrized test passes when all its cases do)."""
    with TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *nodes]
        try:
            subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=timeout,
                           capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return {node: "hang" for node in nodes}
        outcome: dict[str, str] = {}
        for case in ET.parse(report).iter("testcase"):
            name = case.get("name", "").split("[")[0]
            path = case.get("classname", "").replace(".", "/") + ".py"
            failed = any(child.tag in ("failure", "error") for child in case)
            key = f"{path}::{name}"
            outcome[key] = "failed" if failed or outcome.get(key) == "failed" else "passed"
        return outcome


def main() -> int:
    nodes = sorted({n for *_, tests in PROBES for n in tests})
    outcomes = node_outcomes(nodes, timeout=1200)
    counts: collections.Counter[str] = collections.Counter()
    for item, before, now, tests in PROBES:
        results = [outcomes.get(n, "missing") for n in tests]
        if all(r == "passed" for r in results):
            got = now
        elif "hang" in results:
            got = "hang"
        else:
            got = before  # the regression is back
        counts[got] += 1
        print(f"{got:12s} (was {before:12s}) {item}")
    print(f"\ntried {len(PROBES)}: " + ", ".join(
        f"{k} {counts[k]}" for k in ("clear error", "correct", "traceback", "silent wrong", "hang", "lost")))
    return 0 if counts["clear error"] + counts["correct"] == len(PROBES) else 1


if __name__ == "__main__":
    sys.exit(main())
