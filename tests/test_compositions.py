"""Compositions (tokred/compose.py, issue 17): a cache and a token-reduction method as one patch, on the tiny SD 1.5
U-Net and inside a tiny pipeline; the cache's cycle as the timed unit of the per-call arch workload, with its FLOPs
averaged over the cycle; method kinds; the CLI and the listing."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
from test_workloads import TINY_UNET
from tiny_models import tiny_sd_pipeline, tiny_sd_unet

import tokred
from tokred.bench.harness import CaseSkipped, TaskRun, plan_cases
from tokred.compose import Composite, CompositeOptions
from tokred.errors import InvalidOptionError, UnknownMethodError, UnsupportedModelError
from tokred.flops import count_flops
from tokred.method import MethodState
from tokred.registry import methods as method_registry

TIMESTEPS = (900, 800, 700)  # one cycle of deepcache's default interval: a full call, then two reusing ones
LIVE = "up_blocks.3.attentions.2.transformer_blocks.0"  # the one transformer block branch 0 runs on reusing calls
MERGED = "down_blocks.0.attentions.0.transformer_blocks.0"  # merged by tome (level 1), skipped on reusing calls


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)


def denoise(unet, timesteps=TIMESTEPS) -> list[torch.Tensor]:
    sample, text = inputs()
    with torch.no_grad():
        return [unet(sample + 0.1 * i, t, encoder_hidden_states=text).sample for i, t in enumerate(timesteps)]


def equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def unet():
    return tiny_sd_unet()


# --- names, kinds, rules -------------------------------------------------------------------------------------------
def test_kinds_of_the_built_in_methods():
    kinds = {name: tokred.get_method(name).kind for name in tokred.list_methods()}
    assert kinds == {"tome": "merge", "ca_tome": "merge", "cat_pruning": "prune", "todo": "downsample",
                     "deepcache": "cache", "deepcache+tome": "composite", "deepcache+todo": "composite",
                     "first_block_cache": "cache", "pab": "cache", "first_block_cache+todo": "composite",
                     "evit": "prune", "tofu": "merge", "pitome": "merge", "mctf": "merge",
                     "zero_tprune": "prune"}
    assert tokred.Method.kind == "other"  # a plugin that does not say


def test_a_composition_by_name_or_list_is_one_class_with_the_cache_first():
    cls = tokred.get_method("deepcache+tome")
    assert cls is tokred.get_method("tome+deepcache") is tokred.get_method(["tome", "deepcache"])
    assert issubclass(cls, Composite) and cls.name == "deepcache+tome" and cls.kind == "composite"
    assert cls.member_names() == ["deepcache", "tome"] and cls.families() == ["diffusers_unet"]
    assert tokred.get_method(["tome"]) is tokred.get_method("tome")
    # the declared presets combine the members' presets
    assert cls.presets == {"diffusers_unet": {"interval3+ratio0.5": {
        "deepcache.cache_interval": 3, "deepcache.cache_branch_id": 0, "tome.ratio": 0.5}}}
    assert tokred.get_method("deepcache+todo").presets["diffusers_unet"] == {"interval3+factor2": {
        "deepcache.cache_interval": 3, "deepcache.cache_branch_id": 0, "todo.downsample_factor": 2}}
    # an undeclared composition works by name with its members' defaults; it is not listed
    assert tokred.get_method("deepcache+ca_tome").presets == {}
    assert "deepcache+ca_tome" not in tokred.list_methods() and "deepcache+todo" in tokred.list_methods("deep*")


@pytest.fixture
def second_cache():
    deepcache = tokred.get_method("deepcache")
    twin = type("DeepCacheTwin", (deepcache,), {"__module__": __name__})
    method_registry.register("deepcache_twin")(twin)
    yield twin
    method_registry._items.pop("deepcache_twin")


@pytest.mark.parametrize("spec, message", [
    ("tome+todo", r"2 token-reduction methods \(tome, todo\).*one block planner per block"),
    ("deepcache+tome+todo", "token-reduction methods"),
    ("deepcache+tomee", "composition 'deepcache\\+tomee': unknown method 'tomee'; valid methods: .*tome"),
    ("deepcache+deepcache", "names deepcache twice"),
    ("deepcache+", "empty member name"),
    ("deepcache+deepcache_twin", r"2 caches \(deepcache, deepcache_twin\)"),
    ([], "names no method"),
])
def test_bad_compositions_are_refused_with_the_reason(spec, message, second_cache):
    with pytest.raises(UnknownMethodError, match=message):
        tokred.get_method(spec)


def test_a_family_one_member_lacks_is_refused_naming_it(tiny_vit):
    with pytest.raises(UnsupportedModelError, match="'deepcache\\+tome' does not support timm_vit models: deepcache "
                                                    "supports diffusers_unet"):
        tokred.apply(tiny_vit, "deepcache+tome")


# --- options -------------------------------------------------------------------------------------------------------
def test_member_options_by_dict_or_dotted_name(unet):
    with tokred.apply(unet, "deepcache+tome", seed=0, deepcache={"cache_interval": 2}, tome={"ratio": 0.4}) as patch:
        by_dict = denoise(unet)
        assert isinstance(patch.options, CompositeOptions)
        assert patch.options["deepcache"].cache_interval == 2 and patch.options.tome.ratio == 0.4
        values = patch.option_values()
        assert values["deepcache.cache_interval"] == 2 and values["tome.ratio"] == 0.4
    with tokred.apply(unet, ["tome", "deepcache"], seed=0, **{"deepcache.cache_interval": 2, "tome.ratio": 0.4}):
        assert equal(denoise(unet), by_dict)
    with tokred.apply(unet, "deepcache+tome", seed=0, **values):  # option_values() gives the same patch again
        assert equal(denoise(unet), by_dict)


@pytest.mark.parametrize("options, message", [
    ({"ratio": 0.5}, "option 'ratio' does not name a member of deepcache\\+tome; write tome.ratio=... or tome="),
    ({"tome.ratio": 2.0}, "tome \\(diffusers_unet\\): option 'ratio'=2.0 is invalid; valid: "),
    ({"deepcache.cache_interval": 0}, "deepcache \\(diffusers_unet\\): option 'cache_interval'=0 is invalid"),
    ({"tome.rate": 0.5}, "tome \\(diffusers_unet\\): unknown option 'rate'"),
    ({"todo.downsample_factor": 2}, "option 'todo.downsample_factor' does not name a member"),
    ({"tome": 0.5}, "tome= takes a dict of tome's options"),
    ({"tome": {"ratio": 0.5}, "tome.ratio": 0.3}, "option tome.ratio is given twice"),
    ({"deepcache.cache_branch_id": 12}, "deepcache: cache_branch_id=12"),  # the member's own model check
])
def test_bad_member_options_are_refused_naming_the_member(unet, options, message):
    with pytest.raises(InvalidOptionError, match=message):
        tokred.apply(unet, "deepcache+tome", **options)
    assert tokred.get_patch(unet) is None


# --- what it computes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("token_method, options", [("tome", {"tome.ratio": 0.5}), ("todo", {})])
def test_composition_runs_differs_from_each_member_is_deterministic_and_removes_exactly(unet, token_method, options):
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    baseline = denoise(unet)
    alone = {}
    for name, opts in (("deepcache", {}), (token_method, {k.split(".")[1]: v for k, v in options.items()})):
        with tokred.apply(unet, name, seed=0, **opts):
            alone[name] = denoise(unet)
    with tokred.apply(unet, f"deepcache+{token_method}", seed=0, **options) as patch:
        assert type(patch.method_state["deepcache"]).__name__ == "DeepCacheState"
        first, second = denoise(unet), denoise(unet)  # the timestep rises: a new generation, the state reset
        clone = copy.deepcopy(unet)
    assert equal(first, second)
    assert first[0].equal(alone[token_method][0])  # the first call is a full one: the token method alone
    for other in (*alone.values(), baseline):
        assert max(float((a - b).abs().max()) for a, b in zip(first, other, strict=True)) > 1e-4
    assert equal(denoise(unet), baseline)  # remove() is exact
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    assert not any("forward" in vars(m) for m in unet.modules())
    cloned = tokred.get_patch(clone)
    assert cloned is not None and cloned.method.name == f"deepcache+{token_method}"
    assert equal(denoise(clone), first)  # the copy carries its own patch of the same composition and seed
    cloned.remove()
    assert equal(denoise(clone), baseline)


def per_call_tokens(unet, spec: str, **options):
    """Each call's token counts {block: BlockTokens} of a cycle under ``spec``."""
    sample, text = inputs()
    out = []
    with tokred.apply(unet, spec, seed=0, **options) as patch, torch.no_grad():
        for i, t in enumerate(TIMESTEPS):
            patch.reset_token_counts()
            unet(sample + 0.1 * i, t, encoder_hidden_states=text)
            out.append(patch.token_counts())
    return out


def test_the_token_method_acts_only_in_the_blocks_that_run(unet):
    """On the full call ToMe merges in its blocks; on the reusing calls the skipped blocks compute 0 tokens (ToMe
    does not run there) and the live block is merged. Every block records once per call."""
    calls = per_call_tokens(unet, "deepcache+tome", **{"tome.ratio": 0.5})
    merged = {name for name, c in calls[0].items() if c.attn < c.tokens}
    assert MERGED in merged and LIVE in merged and all(name.count("blocks.") for name in merged)
    for counts in calls:
        assert all(c.calls == 1 for c in counts.values())
    for counts in calls[1:]:
        for name, c in counts.items():
            if name == LIVE:
                assert c.attn == c.tokens // 2 and c.mlp == c.tokens  # merged: attention only, as tomesd
            else:
                assert c.attn == c.kv == c.mlp == c.cross == 0 and c.tokens > 0
    todo = per_call_tokens(unet, "deepcache+todo")
    assert todo[1][LIVE].kv == todo[1][LIVE].tokens // 4 and todo[1][MERGED].kv == 0


def cycle_flops(unet, spec: str | None, **options) -> int:
    def run():
        denoise(unet)

    if spec is None:
        return count_flops(run)
    with tokred.apply(unet, spec, seed=0, **options):
        return count_flops(run)


def test_flops_of_a_composition_are_below_either_members(unet):
    base = cycle_flops(unet, None)
    deepcache = cycle_flops(unet, "deepcache")
    for token_method, options in (("tome", {"ratio": 0.5}), ("todo", {})):
        alone = cycle_flops(unet, token_method, **options)
        both = cycle_flops(unet, f"deepcache+{token_method}", **{f"{token_method}.{k}": v for k, v in options.items()})
        assert both < min(deepcache, alone) and max(deepcache, alone) < base, token_method


def test_in_a_pipeline_every_generation_alike_and_removed_exactly():
    pipe = tiny_sd_pipeline()

    def generate():
        with torch.no_grad():
            return pipe("a red cube", num_inference_steps=5, generator=torch.Generator().manual_seed(0),
                        height=32, width=32, output_type="pt").images

    baseline = generate()
    with tokred.apply(pipe, "deepcache"):
        cache_alone = generate()
    for spec in ("deepcache+tome", "deepcache+todo"):
        with tokred.apply(pipe, spec, seed=0) as patch:
            first, second = generate(), generate()
            assert patch.state.generation == 2 and patch.state.step == 5
        with tokred.apply(pipe, spec.split("+")[1], seed=0):
            alone = generate()
        assert torch.equal(first, second)
        assert all(float((first - other).abs().max()) > 1e-4 for other in (alone, cache_alone, baseline)), spec
        assert torch.equal(generate(), baseline)


def test_warmup_and_cycle_of_members_and_compositions():
    def method(spec, family="diffusers_unet", **options):
        cls = tokred.get_method(spec)
        return cls(cls.parse_options(family, options))

    assert method("deepcache").cycle_calls() == 3 and method("deepcache", cache_interval=5).cycle_calls() == 5
    assert method("deepcache", uniform=False).cycle_calls() is None
    assert method("tome").cycle_calls() == 1 and method("cat_pruning").warmup_calls() > 0
    assert method("deepcache+tome", **{"deepcache.cache_interval": 4}).cycle_calls() == 4
    assert method("deepcache+todo", **{"deepcache.uniform": False}).cycle_calls() is None
    both = method("deepcache+cat_pruning")
    assert both.warmup_calls() == method("cat_pruning").warmup_calls() and both.cycle_calls() == 3


# --- benchmarks: the cycle as the timed unit, FLOPs averaged over it -----------------------------------------------
@pytest.fixture(scope="module")
def arch_run():
    settings = {"architecture": "sd15", "config": TINY_UNET, "resolution": 64, "num_inference_steps": 8, "threads": 1}
    run = TaskRun("text_to_image", size="arch", task_kwargs=settings, rounds=2)
    run.build()
    return run


def test_a_cache_is_timed_and_counted_over_its_cycle(arch_run):
    cases = {c.method: c for c in plan_cases("text_to_image", "tome+deepcache,deepcache,todo", "default",
                                               family=arch_run.family)}
    assert set(cases) == {"baseline", "deepcache+tome", "deepcache", "todo"}
    rows = {name: arch_run.run_case(case).extra_info for name, case in cases.items()}
    assert rows["baseline"]["unit"] == rows["todo"]["unit"] == "denoiser call"
    # results schema 6: random weights measure no quality, and every case but the baseline says so
    assert "quality_delta" not in rows["baseline"]
    for name in ("deepcache+tome", "deepcache", "todo"):
        assert rows[name]["quality_delta"] == {}
        assert rows[name]["quality_delta_reason"] == "quality not measured: random weights (size arch, speed only)"
    assert rows["deepcache"]["unit"] == rows["deepcache+tome"]["unit"] == "cycle of 3 denoiser calls"
    # per image: a timed cycle made 3 calls' images (latency is per cycle, s/image and img/s per image)
    for name in ("baseline", "deepcache"):
        row = rows[name]
        calls = 3 if name == "deepcache" else 1
        assert row["s_per_image"] == pytest.approx(row["latency_ms"] / 1000 / (calls * row["items_per_call"]))
        assert row["throughput_per_s"] == pytest.approx(1 / row["s_per_image"])
    # the cycle's FLOPs per call: (1 full + 2 reusing) / 3, counted here call by call
    task = arch_run.task
    call = task.workload()
    with tokred.apply(task.model, "deepcache"):
        call.start(0)
        per_call = []
        for _ in range(3):
            per_call.append(count_flops(call))
            call.advance()
    full, reuse = per_call[0], per_call[1]
    assert per_call[2] == reuse < full and full == pytest.approx(rows["baseline"]["gflops"] * 1e9, rel=1e-9)
    assert rows["deepcache"]["gflops"] * 1e9 == pytest.approx((full + 2 * reuse) / 3, rel=1e-9)
    assert rows["deepcache"]["flops_ideal_speedup"] == pytest.approx(3 * full / (full + 2 * reuse), rel=1e-9)
    assert rows["deepcache+tome"]["gflops"] < rows["deepcache"]["gflops"]
    # the token counts cover the cycle: a block skipped on the reusing calls computed a third of its tokens
    tokens = rows["deepcache"]["tokens"]
    assert all(c["calls"] == 3 for c in tokens.values())
    assert any(c["attn"] == pytest.approx(c["tokens"] / 3) for c in tokens.values())


def test_a_method_without_a_period_is_refused_on_the_per_call_unit(arch_run):
    case = plan_cases("text_to_image", "deepcache", options={"uniform": False}, family=arch_run.family)[1]
    with pytest.raises(CaseSkipped, match="not periodic .*unit=generation"):
        arch_run.run_case(case)
    assert tokred.get_patch(arch_run.task.model) is None


def test_cli_plans_and_runs_a_composition_by_name(tmp_path, capsys):
    from tokred.bench.cli import main

    code = main(["list"])
    out = capsys.readouterr().out
    assert code == 0 and "\ndeepcache+tome: " in out and "\ndeepcache+todo: " in out
    section = out.split("\ndeepcache+tome: ")[1].split("\n\n")[0]
    assert "kind composite" in section and "composition of deepcache, tome" in section
    assert "deepcache.cache_interval" in section and "tome.ratio" in section and "interval3+ratio0.5" in section
    assert "kind cache" in out.split("\ndeepcache: ")[1].split("\n\n")[0]
    out_file = tmp_path / "c.json"
    code = main(["run", "--task", "text_to_image", "--size", "arch", "--methods", "tome+deepcache", "--options",
                 "tome.ratio=0.3", "--set", f"config={TINY_UNET!r}", "--set", "resolution=64", "--set",
                 "num_inference_steps=4", "--set", "threads=1", "--rounds", "2", "--out", str(out_file)])
    assert code == 0
    rows = {b["extra_info"]["method"]: b["extra_info"] for b in json.loads(out_file.read_text())["benchmarks"]}
    assert set(rows) == {"baseline", "deepcache+tome"}
    assert rows["deepcache+tome"]["options"] == {"tome.ratio": 0.3}
    assert rows["deepcache+tome"]["unit"] == "cycle of 3 denoiser calls"
    with pytest.raises(InvalidOptionError, match="option 'ratio' does not name a member"):
        plan_cases("text_to_image", "deepcache+tome", options={"ratio": 0.3})


# --- the leaderboard's kind column and the published rows -------------------------------------------------------
def test_kind_column_reads_the_results_or_the_registry():
    from tokred.leaderboard.sections import method_kind

    assert method_kind("baseline") == "—"
    assert method_kind("tome", "cache") == "cache"  # what the results recorded wins
    assert method_kind("deepcache+todo") == "composite" and method_kind("todo") == "downsample"  # older files
    assert method_kind("not_installed") == "" and method_kind("deepcache+not_installed") == ""


def test_published_deepcache_rows_as_published():
    from tokred.leaderboard.generate import published_table

    text = published_table()
    assert "| method " in text and "| kind " in text
    rows = [line for line in text.splitlines() if line.startswith("| DeepCache")]
    assert len(rows) == 2 and all("| cache " in r for r in rows)
    assert "2.3× with a CLIP Score decline of 0.05" in rows[0] and "arXiv 2312.00858" in rows[0]
    assert "SD2.1 512²" in rows[1] and "(2.32×)" in rows[1] and "diffusers docs" in rows[1]


# --- the main job (the pytest plugin takes compositions too: tests/test_pytest_plugin.py) -----------------------
def test_the_main_job_plans_the_declared_compositions():
    from tokred.bench.harness import plan_sweeps

    planned = {run.task: {(c.method, c.preset) for c in run.cases}
               for run in plan_sweeps(["text_to_image", "vit_classification"], "embedded")}
    assert {("deepcache+tome", "interval3+ratio0.5"), ("deepcache+todo", "interval3+factor2"),
            ("deepcache", "interval3")} <= planned["text_to_image"]
    assert not any(m.startswith("deepcache") for m, _ in planned["vit_classification"])


# --- a cache that wraps block forwards as diffusers' hooks do (first-block caching's way) ---------------------------
class SkipEverySecondCall(MethodState):
    """The test cache's state: each block's output of its last computed call."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.outputs: dict[str, torch.Tensor] = {}


def register_hook_cache():
    """A cache that installs with diffusers' ``HookRegistry`` (as the diffusers-hook caches do): it wraps whatever
    forward a transformer block has at install time, and on even denoiser calls returns the block's previous
    output without running it."""
    from diffusers.hooks.hooks import HookRegistry, ModelHook

    class HookCache(tokred.Method):
        kind = "cache"
        options = {"diffusers_unet": HookCacheOptions}
        State = SkipEverySecondCall

        def install(self, patch) -> None:
            state, cache = patch.state, patch.method_state
            for name, block in patch.adapter.blocks:
                class Skip(ModelHook):
                    def new_forward(self, module, *args, _name=name, **kwargs):
                        if state.step % 2 == 0 and _name in cache.outputs:
                            return cache.outputs[_name]
                        cache.outputs[_name] = self.fn_ref.original_forward(*args, **kwargs)
                        return cache.outputs[_name]

                before = vars(block).get("forward")  # the token member's forward, installed first
                registry = HookRegistry.check_if_exists_or_initialize(block)
                registry.register_hook(Skip(), "hook_cache")

                def undo(block=block, registry=registry, before=before):
                    registry.remove_hook("hook_cache", recurse=False)
                    if before is None:
                        vars(block).pop("forward", None)
                    vars(block).pop("_diffusers_hook", None)

                patch.on_remove(undo)

    return HookCache


@dataclass
class HookCacheOptions:
    pass


@pytest.fixture
def hook_cache():
    cls = register_hook_cache()
    method_registry.register("hook_cache")(cls)
    yield cls
    method_registry._items.pop("hook_cache")


def test_a_cache_that_wraps_forwards_wraps_the_token_methods(unet, hook_cache):
    """Members install innermost first, so a cache that wraps the blocks' forwards (diffusers' hooks) wraps the
    token method's: on its skipping calls the token method does not run, and remove() undoes both exactly."""
    baseline = denoise(unet)
    with tokred.apply(unet, "tome", seed=0) as patch:
        alone = denoise(unet)
        assert {c.calls for c in patch.token_counts().values()} == {3}
    with tokred.apply(unet, "tome+hook_cache", seed=0) as patch:
        assert patch.method.name == "hook_cache+tome"
        both = denoise(unet)
        assert {c.calls for c in patch.token_counts().values()} == {2}  # call 2 skipped every block
        assert any(c.attn < c.tokens for c in patch.token_counts().values())  # calls 1 and 3 merged
    assert both[0].equal(alone[0]) and not both[1].equal(alone[1])
    assert equal(denoise(unet), baseline)
    assert not any("forward" in vars(m) or "_diffusers_hook" in vars(m) for m in unet.modules())


# --- diffusers-hook caches with ToDo on SD3 (methods/diffusers_caches.py) --------------------------------------------
@pytest.mark.parametrize("cache", ["first_block_cache", "pab"])
def test_a_diffusers_hook_cache_with_todo_on_sd3(cache):
    from test_diffusers_caches import OPTIONS, TIMESTEPS, count_runs, generate, module_state
    from tiny_sd3 import tiny_sd3_transformer

    model = tiny_sd3_transformer(num_layers=4)
    names, _ = module_state(model)
    base = generate(model)
    with tokred.apply(model, "todo", downsample_factor=2):
        todo_alone = generate(model)
    with tokred.apply(model, cache, **OPTIONS[cache]):
        cache_alone = generate(model)
    options = {cache: OPTIONS[cache], "todo.downsample_factor": 2}
    with tokred.apply(model, f"todo+{cache}", **options) as patch:
        assert patch.method.name == f"{cache}+todo" and patch.method.cycle_calls() is None  # not periodic
        counts, handles = count_runs(model)
        both, again = generate(model), generate(model)
        tokens = patch.token_counts()
        for h in handles:
            h.remove()
    assert torch.equal(both, again) and torch.equal(both[0], todo_alone[0])  # the first call computes all, reduced
    assert not any(torch.equal(both, other) for other in (todo_alone, cache_alone, base))
    for t in tokens.values():  # one record per call: ToDo's keys/values where attention ran, 0 where it was reused
        assert t.calls == 2 * len(TIMESTEPS) and t.kv == pytest.approx(t.attn / 4)
    assert counts["to_q"] < 2 * len(TIMESTEPS) * len(model.transformer_blocks)  # the cache skipped some
    assert torch.equal(generate(model), base) and module_state(model)[0] == names
    if cache == "first_block_cache":
        assert tokred.get_method(f"{cache}+todo").presets["diffusers_mmdit"] == {
            "threshold0.05+factor2": {"first_block_cache.threshold": 0.05, "todo.downsample_factor": 2}}
