"""The search space as data: NVIDIA's seven GPUNets lie inside it, and its samples are specs."""

from __future__ import annotations

import json

import pytest

from gpunet_core.cli import main as gpunet
from gpunet_core.models.spec import MODEL_INFO, load_spec, spec_json, spec_path
from gpunet_core.search.space import (
    RandomChooser,
    SearchSpaceError,
    fits_resolution,
    load_space,
    spec_hash,
)


@pytest.fixture(scope="module")
def space():
    return load_space()


@pytest.mark.parametrize("name", list(MODEL_INFO))
def test_every_published_gpunet_lies_in_the_space(space, name):
    assert space.violations(spec_path(name)) == []


def test_two_hundred_samples_build_and_pass_gpunet_spec(space, tmp_path, capsys):
    hashes = set()
    for seed in range(200):
        spec = space.sample(RandomChooser(seed), num_classes=10)
        assert space.violations(spec) == [], seed  # the sampler stays inside its own space
        assert fits_resolution(spec) is None
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps(spec))
        assert gpunet(["spec", str(path), "--json"]) == 0, seed
        shown = json.loads(capsys.readouterr().out)
        assert shown["img_resolution"] == spec[0]["img_resolution"]
        hashes.add(spec_hash(spec))
    assert len(hashes) == 200  # 200 different architectures
    families = {space.sample(RandomChooser(s)).__getitem__(0)["distill"] for s in range(20)}
    assert families == {False, True}


def test_only_a_stages_first_block_strides_and_stages_stay_uniform(space):
    spec = space.sample(RandomChooser(7), num_classes=10, families=["non_d"])
    by_stage: dict[int, list[dict]] = {}
    for layer in spec[2:-1]:
        by_stage.setdefault(layer["stage"], []).append(layer)
    for blocks in by_stage.values():
        assert all(b["stride"] == 1 for b in blocks[1:])
        assert len({(b["num_out_channels"], b["kernel_size"], b.get("expansion"))
                    for b in blocks}) == 1


def test_violations_name_what_lies_outside(space):
    spec = spec_json("gpunet_0")
    spec[10]["stride"] = 2  # the second IRB of stage 4
    spec[-2]["num_out_channels"] = 4096
    spec[-1]["num_in_channels"] = 4096
    problems = space.violations(spec)
    assert any("stage 4 layer 1: stride 2" in p for p in problems)
    assert any("width 4096 outside" in p for p in problems)
    small = spec_json("gpunet_0")
    small[0]["img_resolution"] = 64
    assert space.violations(small) == ["resolution 64 outside [224, 544]"]


def test_fits_resolution_finds_a_vanishing_feature_map(space):
    spec = space.smallest("non_d", num_classes=10, resolution=32)
    assert fits_resolution(spec) is None
    tiny = [dict(e) for e in spec]
    tiny[0]["img_resolution"] = 8  # 4 px after the stem, 1 after stage 2's padding-0 conv
    assert "leaves no pixels" in fits_resolution(tiny)
    load_spec(tiny)  # a valid spec: only its resolution is too small


def test_spec_hash_is_canonical():
    a = spec_json("gpunet_1")
    b = [dict(reversed(list(e.items()))) for e in a]
    assert spec_hash(a) == spec_hash(b) != spec_hash(spec_json("gpunet_0"))


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda d: d.pop("resolution"), "missing field 'resolution'"),
    (lambda d: d["families"]["non_d"]["stages"][2].update(depth=[4, 1]), "stages[2].depth"),
    (lambda d: d["families"]["d"]["stages"][0].update(types=["mbconv"]),
     "families.d.stages[0].types: ['mbconv'] not among"),
    (lambda d: d["families"]["non_d"]["expansion"].update(choices=[9]),
     "expansion.choices [9] must lie in [1, 8]"),
])
def test_a_bad_space_file_names_its_field(tmp_path, edit, fragment):
    import yaml

    from gpunet_core.search.space import default_space_path

    data = yaml.safe_load(default_space_path().read_text())
    edit(data)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SearchSpaceError, match=None) as info:
        load_space(path)
    assert fragment in str(info.value)


def test_a_missing_space_file_is_one_clear_error(tmp_path):
    with pytest.raises(SearchSpaceError, match="search space file not found"):
        load_space(tmp_path / "nope.yaml")
