"""The speedup-against-resolution section: grouping, the table's cells, published points and the plot."""

from __future__ import annotations

import re

from tokred.leaderboard.scaling import scaling_groups, scaling_markdown, scaling_plot

RESOLUTIONS = (512, 1024, 2048)


def entry(method, preset, resolution, speedup=None, ci=None, ideal=None, efficiency=None, contended=False,
          dtype="float32", architecture="sd15", top_level=False, gflops=100.0):
    info = {
        "tokred": 2, "task": "text_to_image", "size": "arch", "method": method, "preset": preset,
        "options_repr": "", "device": "cpu", "device_name": "Test CPU 9000", "dtype": dtype, "threads": 2,
        "speedup": speedup if speedup is not None else 1.0, "speedup_ci": ci or [1.0, 1.0],
        "flops_ideal_speedup": ideal if ideal is not None else 1.0,
        "efficiency": efficiency if efficiency is not None else 1.0, "gflops": gflops, "contended": contended,
        "unit": "denoiser call", "task_info": {"resolution": resolution},
    }
    if top_level:
        info["architecture"] = architecture
        info["task_info"]["architecture"] = "ignored"
    else:
        info["task_info"]["architecture"] = architecture
    return {"name": f"{method}-{preset}-{resolution}", "extra_info": info}


def benchmarks(**kwargs):
    out = [entry("baseline", "baseline", r, **kwargs) for r in RESOLUTIONS]
    out += [
        entry("tome", "ratio0.5", 512, 1.05, [1.01, 1.10], 1.20, 0.875, **kwargs),
        entry("tome", "ratio0.5", 1024, 1.39, [1.31, 1.45], 1.52, 0.914, **kwargs),
        entry("tome", "ratio0.5", 2048, 1.80, [1.70, 1.90], 2.00, 0.90, contended=True, **kwargs),
        entry("todo", "factor2", 512, 1.10, [1.00, 1.20], 1.25, 0.88, **kwargs),
        entry("todo", "factor2", 2048, 2.50, [2.40, 2.60], 3.00, 0.8333, **kwargs),  # no 1024 case
    ]
    return out


def table(markdown):
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    end = next((i for i, line in enumerate(lines[2:], 2) if split(line) and split(line)[0] == "method"), len(lines))
    headers = split(lines[0])
    return headers, [dict(zip(headers, split(line), strict=True)) for line in lines[2:end]]


def test_one_group_with_rows_and_resolution_columns():
    groups = scaling_groups(benchmarks())
    assert len(groups) == 1
    group = groups[0]
    assert group.resolutions == [512, 1024, 2048]
    assert group.rows == [("todo", "factor2"), ("tome", "ratio0.5")]
    text = scaling_markdown(group, None)
    assert text.splitlines()[0] == ("### Speedup against resolution: sd15 (SD1.5 U-Net) on Test CPU 9000, float32, "
                                    "2 threads, unit: denoiser call")
    headers, rows = table(text)
    assert headers == ["method", "kind", "preset", "512²", "1024²", "2048²"]
    assert [(r["method"], r["preset"]) for r in rows] == [("todo", "factor2"), ("tome", "ratio0.5")]  # no baseline
    assert [r["kind"] for r in rows] == ["downsample", "merge"]  # no method_kind recorded: the registry's
    tome = rows[1]
    assert tome["1024²"] == "1.39× [1.31, 1.45] · ideal 1.52× · 91%"
    assert tome["512²"] == "1.05× [1.01, 1.10] · ideal 1.20× · 88%"
    assert tome["2048²"] == "1.80× [1.70, 1.90] · ideal 2.00× · 90% (contended)"
    todo = rows[0]
    assert todo["1024²"] == "—"
    assert todo["2048²"] == "2.50× [2.40, 2.60] · ideal 3.00× · 83%"
    assert "(contended)" not in todo["512²"]
    assert "![" not in text


def test_a_cache_timed_over_its_cycle_joins_the_per_call_rows():
    cached = []
    for resolution, speedup in ((512, 2.0), (1024, 2.2)):
        e = entry("deepcache+tome", "interval3+ratio0.5", resolution, speedup, [1.9, 2.4], 2.5, 0.8)
        e["extra_info"].update(unit="cycle of 3 denoiser calls", method_kind="composite")
        cached.append(e)
    groups = scaling_groups(benchmarks() + cached)
    assert len(groups) == 1 and groups[0].unit == "denoiser call"
    text = scaling_markdown(groups[0], None)
    rows = {r["method"]: r for r in table(text)[1]}
    assert rows["deepcache+tome"]["kind"] == "composite" and rows["deepcache+tome"]["2048²"] == "—"
    assert "timed over a whole cycle of their calls (cycle of 3 denoiser calls)" in text
    assert "cycle of" not in scaling_markdown(scaling_groups(benchmarks())[0], None)


def test_later_entry_wins_and_derived_values():
    data = benchmarks() + [entry("tome", "ratio0.5", 1024, 1.20, [1.10, 1.30], 1.50, 0.80)]
    headers, rows = table(scaling_markdown(scaling_groups(data)[0], None))
    assert rows[1]["1024²"] == "1.20× [1.10, 1.30] · ideal 1.50× · 80%"
    # no FLOPs-ideal or efficiency recorded: the baseline's GFLOPs at that resolution over the row's
    late = entry("todo", "factor2", 1024, 1.50, [1.40, 1.60], gflops=50.0)
    del late["extra_info"]["flops_ideal_speedup"], late["extra_info"]["efficiency"]
    headers, rows = table(scaling_markdown(scaling_groups(benchmarks() + [late])[0], None))
    assert rows[0]["1024²"] == "1.50× [1.40, 1.60] · ideal 2.00× · 75%"


def test_single_resolution_and_dtype_split_groups():
    only_512 = [b for b in benchmarks() if b["extra_info"]["task_info"]["resolution"] == 512]
    assert scaling_groups(only_512) == []
    groups = scaling_groups(benchmarks() + benchmarks(dtype="bfloat16"))
    assert sorted(g.dtype for g in groups) == ["bfloat16", "float32"]
    assert all(len(g.rows) == 2 and g.resolutions == [512, 1024, 2048] for g in groups)
    # entries without extra_info.tokred are not tokred's
    foreign = [{"name": b["name"], "extra_info": {k: v for k, v in b["extra_info"].items() if k != "tokred"}}
               for b in benchmarks(dtype="float16")]
    assert [g.dtype for g in scaling_groups(benchmarks() + foreign)] == ["float32"]


def test_top_level_architecture_is_preferred():
    groups = scaling_groups(benchmarks(architecture="sd3", top_level=True))
    assert [g.architecture for g in groups] == ["sd3"]


def test_published_points_by_architecture():
    sd15 = scaling_markdown(scaling_groups(benchmarks())[0], "scaling.png")
    assert "![Speedup against resolution: sd15 (SD1.5 U-Net)" in sd15 and "](scaling.png)" in sd15
    measured, published = sd15.split("Published scaling points (not measured by us)")
    assert "diffusers issue #2940" not in measured
    assert "https://github.com/huggingface/diffusers/issues/2940" in published
    tome = {r["resolution"]: r["published speedup"] for r in table(published)[1] if r["method"].startswith("ToMe")}
    assert tome == {"512²": "1.01×", "1024²": "1.22×", "2048²": "1.65×"}
    assert "arXiv 2402.13573" in published and "about 1.5×" in published
    sd3 = scaling_markdown(scaling_groups(benchmarks(architecture="sd3"))[0], None)
    assert "Published scaling points" not in sd3 and "2940" not in sd3
    assert re.search(r"^### Speedup against resolution: sd3 \(SD3 MMDiT\)", sd3)


def test_plot_is_written(tmp_path):
    path = tmp_path / "scaling.png"
    scaling_plot(scaling_groups(benchmarks())[0], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scaling.png"]  # no temporary left behind
