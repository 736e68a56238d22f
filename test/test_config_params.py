"""Parameters from one source: ranges, steps and docs in the config dataclasses' metadata, the
same checks for ``spark3r map`` flags as for the node, errors that name what the user set, and
the reduction method's parameters as ``reduction.<name>``."""
from dataclasses import fields

import pytest

from spark3r.mapping.config import (BackboneConfig, KeyframeConfig, MapConfig, MapperConfig, OutputConfig, WindowConfig,
                                    parameter_specs, reduction_parameter_specs)
from spark3r.offline import cli as map_cli


@pytest.mark.parametrize("cls", [KeyframeConfig, WindowConfig, MapConfig, OutputConfig, BackboneConfig])
def test_every_numeric_parameter_has_a_doc_and_a_range(cls):
    specs = parameter_specs(cls)
    assert set(specs) == {f.name for f in fields(cls)} - {"reduction_params"}
    for spec in specs.values():
        assert spec.doc, spec.name
        if isinstance(spec.default, (int, float)) and not isinstance(spec.default, bool):
            assert spec.range is not None and spec.range[0] <= spec.default <= spec.range[1], spec.name
        spec.check(spec.default)  # every default is accepted by its own range


def test_range_and_step_come_from_the_metadata():
    width = parameter_specs(BackboneConfig)["image_width"]
    assert (width.range, width.step) == ((28, 4088), 14)
    for bad in (5012, 14, 500, 56.0, True):
        with pytest.raises(ValueError, match=r"image_width=.* expected an integer in \[28, 4088\]"):
            BackboneConfig(image_width=bad)
    assert BackboneConfig(image_width=4088).image_width == 4088
    with pytest.raises(ValueError, match=r"camera_center_weight=1.0 .*\[0, 1\)"):
        WindowConfig(camera_center_weight=1.0)
    with pytest.raises(ValueError, match="dtype='float64' .*one of float32, bfloat16, float16"):
        BackboneConfig(dtype="float64")


@pytest.mark.parametrize("values, blamed", [
    ({"window_size": 100}, "window_size=100"),               # max_pending_keyframes (64, untouched) < window_size
    ({"window_size": 4}, "window_size=4"),                   # window_stride (8, untouched) >= window_size
    ({"window_stride": 16}, "window_stride=16"),
    ({"max_pending_keyframes": 8}, "max_pending_keyframes=8"),
    ({"window_size": 9, "min_shared_keyframes": 2}, "min_shared_keyframes=2"),
    ({"min_time_gap_s": 3.0}, "min_time_gap_s=3.0"),
    ({"max_time_gap_s": 0.01}, "max_time_gap_s=0.01"),
])
def test_a_violated_relation_names_the_parameter_the_user_set(values, blamed):
    with pytest.raises(ValueError) as info:
        MapperConfig.from_flat(values)
    assert str(info.value).startswith(blamed + " is invalid"), str(info.value)


def test_reduction_parameters_are_flat_parameters_of_the_registered_methods():
    pytest.importorskip("torch")
    specs = reduction_parameter_specs()
    assert {"reduction.query_keep", "reduction.query_group", "reduction.kv_score", "reduction.ratio"} <= set(specs)
    assert "reduction.schedule" not in specs  # the schedule file is reduction_schedule
    cfg = BackboneConfig.from_flat({"reduction": "spark3r", "reduction.query_keep": 1, "reduction.query_group": [2, 2],
                                    "reduction.ratio": 0.9})
    assert cfg.reduction_params == {"query_keep": 1}  # defaults are left to the method
    with pytest.raises(ValueError, match="reduction.query_keep=1 is set but reduction='dense' has no parameter"):
        BackboneConfig.from_flat({"reduction": "dense", "reduction.query_keep": 1})
    with pytest.raises(ValueError, match=r"reduction.query_keep=1.5 is invalid: expected an integer"):
        BackboneConfig.from_flat({"reduction": "spark3r", "reduction.query_keep": 1.5})
    with pytest.raises(ValueError, match="unknown parameter reduction.nope"):
        BackboneConfig.from_flat({"reduction": "spark3r", "reduction.nope": 1})


def _map(argv, capsys):
    code = map_cli.main(argv + ["--no-progress"])
    return code, capsys.readouterr().err


def test_spark3r_map_checks_every_parameter_before_any_work(tmp_path, capsys):
    missing = str(tmp_path / "no_such_input")  # the parameters are refused before the input is opened
    out = ["--out", str(tmp_path / "out")]
    code, err = _map([missing, *out, "--image-width", "5012"], capsys)
    assert code == 2 and "image_width=5012 is invalid" in err and "[28, 4088]" in err and "no_such_input" not in err
    code, err = _map([missing, *out, "--param", "window_size=5000"], capsys)
    assert code == 2 and "window_size=5000 is invalid" in err and "max_pending_keyframes=" not in err
    code, err = _map([missing, *out, "--param", "window_size=100"], capsys)
    assert code == 2 and err.split("error: ")[1].startswith("window_size=100 is invalid")
    code, err = _map([missing, *out, "--param", "reduction.query_keep=1"], capsys)
    assert code == 2 and "reduction.query_keep=1 is set but reduction='dense'" in err
    code, err = _map([missing, *out, "--param", "query_keep=1"], capsys)
    assert code == 2 and "unknown mapper parameters ['query_keep']" in err
    assert not (tmp_path / "out").exists()


def test_spark3r_map_reduction_parameters_reach_the_backbone_config():
    pytest.importorskip("torch")
    parser = map_cli.argparse.ArgumentParser()
    map_cli.add_arguments(parser)
    args = parser.parse_args(["in", "--out", "o", "--reduction", "spark3r", "--reduction-params", '{"kv_score": "key_norm"}',
                              "--param", "reduction.query_keep=1", "--param", "reduction.query_group=[2, 2]"])
    cfg, info = map_cli.build_backbone(args, map_cli.parse_params(args.param))
    assert cfg.reduction_params == {"kv_score": "key_norm", "query_keep": 1} == info["reduction_params"]
