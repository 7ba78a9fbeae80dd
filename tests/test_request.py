"""The render request at the edge: aliases, and messages for unknown fields that point at the right name."""

from __future__ import annotations

import json

import pytest

from longtake.cli import build_parser
from longtake.cli.render import request_from_args
from longtake.request import FIELD_BOUNDS, RenderRequest, RequestError, parse_request


def test_negative_is_an_alias_of_negative_prompt_and_dumps_by_name(tmp_path):
    out = str(tmp_path / "o.mp4")
    by_alias = parse_request({"prompt": "a ball", "negative": "blurry", "out": out})
    by_name = parse_request({"prompt": "a ball", "negative_prompt": "blurry", "out": out})
    assert by_alias.negative_prompt == by_name.negative_prompt == "blurry"
    # other code (the farm's request.json, serve's job store, the engine) reads requests by field name
    for dumped in (by_alias.model_dump(), json.loads(by_alias.model_dump_json())):
        assert dumped["negative_prompt"] == "blurry" and "negative" not in dumped
    assert parse_request(by_alias.model_dump()) == by_alias  # a dumped request reads back
    assert RenderRequest(prompt="a ball", negative_prompt="x", out=out).negative_prompt == "x"  # by name in Python


def test_negative_and_negative_prompt_together_is_an_error_naming_the_field(tmp_path):
    with pytest.raises(RequestError) as e:
        parse_request({"prompt": "a ball", "negative": "blurry", "negative_prompt": "dark",
                       "out": str(tmp_path / "o.mp4")})
    assert e.value.field == "negative_prompt"
    assert "negative" in e.value.expected and "not both" in e.value.expected


def test_cli_negative_still_sets_negative_prompt(tmp_path):
    args = build_parser().parse_args(["render", "a ball", "--negative", "blurry", "--out", str(tmp_path / "o.mp4")])
    assert request_from_args(args).negative_prompt == "blurry"


@pytest.mark.parametrize("data, message", [
    ({"negtive": "x"}, "negtive: got 'x', expected no such field (did you mean 'negative_prompt'?)"),
    ({"negative_promt": "x"}, "negative_promt: got 'x', expected no such field (did you mean 'negative_prompt'?)"),
    ({"second": 3}, "second: got 3, expected no such field (did you mean 'seconds'?)"),
    ({"guidence": 3}, "guidence: got 3, expected no such field (did you mean 'guidance'?)"),
    ({"colour": "red"}, "colour: got 'red', expected no such field (see `longtake render --help`)"),
])
def test_unknown_field_suggests_the_closest_field(tmp_path, data, message):
    with pytest.raises(RequestError) as e:
        parse_request({"prompt": "a ball", "out": str(tmp_path / "o.mp4"), **data})
    assert str(e.value) == message


def test_unknown_timeline_key_suggests_the_closest_key():
    with pytest.raises(RequestError) as e:
        parse_request({"timeline": [{"at": 0, "promt": "a ball"}]})
    assert str(e.value) == "timeline[0].promt: got 'a ball', expected no such field (did you mean 'prompt'?)"


def _base(name: str) -> dict:
    """A valid request that a value of `name` can be tried in (the fields some rules need)."""
    base = {"prompt": "a red ball", "seconds": 2}
    if name == "strength":
        base["video"] = "in.mp4"
    if name == "context":
        base["extend"] = "in.mp4"
    if name == "overlap":
        base["window"] = 10**6
    if name == "control_scale":
        base["pose"] = "pose.json"
    return base


@pytest.mark.parametrize("name", sorted(n for n, b in FIELD_BOUNDS.items() if b))
def test_field_bounds_are_what_the_validators_take(name, tmp_path):
    """FIELD_BOUNDS (what the served OpenAPI schema documents) against the validators: each bound is
    accepted and a value just past it refused, naming the field."""
    import re

    bounds = FIELD_BOUNDS[name]
    ok, bad = [], []
    for key, limit in bounds.items():
        step = 1 if name in ("height", "width", "steps", "seed", "window", "overlap", "workers") else 1e-6
        if key == "minimum":
            ok.append(limit)
            bad.append(limit - step)
        elif key == "maximum":
            ok.append(limit)
            bad.append(limit + step if step == 1 or limit < 1e6 else limit * 1.001)
        elif key == "exclusiveMinimum":
            ok.append(limit + {"fps": 0.5, "seconds": 0.125}.get(name, step))  # (still one frame)
            bad.append(limit)
        elif key == "maxLength":
            ok.append("x" * limit)
            bad.append("x" * (limit + 1))
        elif key == "pattern":
            ok.append("a b")
            bad.append("   ")
            assert re.search(limit, "a b") and not re.search(limit, "   ")
    for value in ok:
        req = parse_request({**_base(name), name: value, "out": str(tmp_path / "a.mp4")})
        assert getattr(req, name) == value
    for value in bad:
        with pytest.raises(RequestError) as e:
            parse_request({**_base(name), name: value, "out": str(tmp_path / "a.mp4")})
        assert e.value.field == name, (value, e.value)
