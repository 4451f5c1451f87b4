"""A model family from a package outside the repository, found through the `videocache.families` entry point.

The package (written into a temporary folder with its own dist-info, as `pip install` would leave it) covers
`ToyVideoTransformer`, a renamed subclass of diffusers' WanTransformer3DModel that no built-in family names:
the nearest class of its MRO that a family covers is its own, so the plugin family, not Wan's, answers for it.
Its declaration reuses videocache's public Wan pieces (a derivative model's package would do the same) under its
own architecture name, so a profile made for it is not a Wan profile. Checked: discovery, apply/remove
bit-identical, `videocache compare` with a diffusers peer (workers in their own processes find the family through
the entry point), the fg/bg stage of `videocache profile`, the parallel pre-load checks, and a one-line error
naming each piece a bare family (an adapter and defaults alone) lacks.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import videocache as vc
from videocache.cli import main
from videocache.family import ModelFamily, families, register_family, unregister_family
from videocache.pipelines.loader import REFERENCE_DIR, preload_geometry

PLUGIN = '''
"""toyfamily: a third-party videocache model family for ToyVideoTransformer."""
from diffusers import ModelMixin, WanTransformer3DModel  # noqa: F401 - diffusers finds the loader through ModelMixin

from videocache.family import GenerationDefaults, ModelFamily
from videocache.pipelines.wan.adapter import WanAdapter
from videocache.pipelines.wan.flops import wan_flop_points
from videocache.pipelines.wan.loading import wan_geometry
from videocache.pipelines.wan.parallel import wan_parallel_plan
from videocache.pipelines.wan.probes import wan_attention_probe


class ToyVideoTransformer(WanTransformer3DModel):
    """A Wan transformer under another name."""


class ToyAdapter(WanAdapter):
    architecture = "ToyVideoTransformer"


FAMILY = ModelFamily(
    name="toy",
    transformers=("ToyVideoTransformer",),
    adapter=ToyAdapter(),
    parallel_plan=wan_parallel_plan,
    attention_probe=wan_attention_probe,
    flop_points=wan_flop_points,
    defaults=GenerationDefaults(9, 32, 32, 10, 5.0, 8),
    geometry=wan_geometry,
)
BARE = ModelFamily(name="toy", transformers=("ToyVideoTransformer",), adapter=ToyAdapter(), defaults=FAMILY.defaults)
'''
SMALL = ["--steps", "10", "--frames", "9", "--height", "32", "--width", "32", "--no-progress"]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The installed plugin (on sys.path, with its entry point), a pipeline folder of its model and a profile."""
    root = tmp_path_factory.mktemp("plugin")
    site = root / "site"
    (site / "toyfamily").mkdir(parents=True)
    (site / "toyfamily" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "toyfamily-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyfamily\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[videocache.families]\ntoy = toyfamily:FAMILY\n")
    sys.path.insert(0, str(site))
    families(refresh=True)
    try:
        from diffusers import WanPipeline
        from toyfamily import ToyVideoTransformer

        pipe = WanPipeline.from_pretrained(REFERENCE_DIR)
        toy = ToyVideoTransformer.from_config(pipe.transformer.config)
        toy.load_state_dict(pipe.transformer.state_dict())
        pipe.transformer = toy
        pipe.register_modules(transformer=toy)
        folder = root / "toy-pipeline"
        pipe.save_pretrained(folder)
        profiles = root / "profiles"
        profiles.mkdir()
        data = yaml.safe_load((vc.profile.PROFILES_DIR / "reference-wan.yaml").read_text())
        data["name"] = "toy"
        data["model"]["architecture"] = "ToyVideoTransformer"
        data.pop("fgbg", None)
        (profiles / "toy.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        yield {"site": site, "folder": folder, "profiles": profiles}
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("toyfamily", None)
        families(refresh=True)


@pytest.fixture
def bare(plugin):
    """The plugin family reduced to its adapter and defaults (registered in this process over its entry point)."""
    from toyfamily import BARE

    register_family(BARE)
    yield BARE
    unregister_family("toy")


def _pipe(folder: Path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe) -> np.ndarray:
    out = pipe("a red circle moving left on a black background", num_inference_steps=10, num_frames=9, height=32,
               width=32, generator=torch.Generator().manual_seed(0), output_type="np")
    return out.frames[0]


def test_the_entry_point_family_covers_its_class_before_wan(plugin):
    found = families()
    assert isinstance(found["toy"], ModelFamily) and {"wan", "hunyuan", "opensora"} <= set(found)
    pipe = _pipe(plugin["folder"])
    assert type(pipe.transformer).__name__ == "ToyVideoTransformer"
    assert vc.family_of(pipe.transformer).name == "toy"
    assert vc.get_adapter(pipe.transformer).fingerprint(pipe.transformer)["architecture"] == "ToyVideoTransformer"


def test_apply_and_remove_are_bit_identical(plugin):
    pipe = _pipe(plugin["folder"])
    plain = _generate(pipe)
    profile = plugin["profiles"] / "toy.yaml"
    engine = vc.apply(pipe, profile, "full")
    assert np.array_equal(_generate(pipe), plain)  # the full table computes every cell
    assert engine.stats()["computed_fraction"] == 1.0
    vc.remove(pipe)
    vc.apply(pipe, profile, "fast")
    cached = _generate(pipe)
    assert vc.get_engine(pipe).stats()["computed_fraction"] < 0.6 and not np.array_equal(cached, plain)
    vc.remove(pipe)
    assert np.array_equal(_generate(pipe), plain)
    with pytest.raises(vc.ProfileError, match="is for WanTransformer3DModel"):
        vc.apply(pipe, "reference-wan")  # a Wan profile does not fit the plugin's model


def test_fgbg_stage_of_profile_uses_the_family_probe(plugin):
    from videocache.pipelines.attention_capture import profile_pipeline

    pipe = _pipe(plugin["folder"])
    result = profile_pipeline(pipe, ["a red circle moving left on a black background"], [6, 8], progress=False,
                              num_inference_steps=10, num_frames=9, height=32, width=32)
    assert len(result.r_attn) == len(pipe.transformer.blocks)


def test_parallel_checks_before_loading(plugin, tmp_path, capsys):
    assert preload_geometry(str(plugin["folder"]), 9, 32, 32) == (4, 48)  # 4 heads; 3 x 4 x 4 tokens
    rc = main(["generate", "--model", str(plugin["folder"]), "--prompt", "x", "--ulysses", "3", *SMALL,
               "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--ulysses 3 needs 3 processes, but 1 was launched" in err


def test_compare_with_a_diffusers_peer(plugin, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VIDEOCACHE_PROFILES", str(plugin["profiles"]))
    monkeypatch.setenv("PYTHONPATH", str(plugin["site"]))  # worker processes find the plugin's entry point
    (tmp_path / "prompts.txt").write_text("a red circle moving left on a black background\n")
    rc = main(["compare", "--model", str(plugin["folder"]), "--prompts", str(tmp_path / "prompts.txt"),
               "--methods", "videocache:toy:slow", "diffusers:fbcache:0.2", "--out", str(tmp_path / "cmp"),
               "--repeats", "1", *SMALL])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    entries = {e["method"]: e for e in report["methods"]}
    assert set(entries) == {"none", "videocache:toy:slow", "diffusers:fbcache:0.2"}
    for spec in ("videocache:toy:slow", "diffusers:fbcache:0.2"):  # counted at the plugin's FLOP points
        assert "error" not in entries[spec], entries[spec]
        assert 0.0 < entries[spec]["computed_fraction"] < 1.0 and math.isfinite(entries[spec]["psnr"]), spec


@pytest.mark.parametrize("command, piece", [
    (["generate", "--prompt", "x", "--ulysses", "2"], "parallel_plan"),
    (["profile", "--budget", "0.5", "--prompts", "PROMPTS"], "attention_probe"),
    (["compare", "--prompts", "PROMPTS"], "flop_points"),
])
def test_a_missing_piece_is_a_one_line_error_naming_it(plugin, bare, tmp_path, capsys, command, piece):
    (tmp_path / "prompts.txt").write_text("a prompt\n")
    argv = [str(tmp_path / "prompts.txt") if a == "PROMPTS" else a for a in command]
    argv += ["--model", str(plugin["folder"]), *(SMALL if command[0] != "profile" else SMALL[:-1])]
    argv += ["--out", str(tmp_path / ("o.yaml" if command[0] == "profile" else "o"))]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"the toy model family declares no {piece}" in err
    assert not (tmp_path / "o").exists()


def test_a_model_no_family_covers_is_a_one_line_error(tmp_path):
    class Unknown(torch.nn.Module):
        pass

    with pytest.raises(vc.FamilyError, match="no model family for Unknown"):
        vc.apply_to_transformer(Unknown(), None, "reference-wan")
