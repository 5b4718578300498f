"""FrameParams (headavatar/headmodels/params.py): one type for a batch of frames' head-model inputs,
the same from the host tracking and from the device-resident one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headavatar.headmodels import load_head_model
from headavatar.headmodels.params import FrameParams
from headavatar.subjects.format import Tracking


@pytest.fixture(scope="module")
def head():
    return load_head_model({"name": "procedural"})


def _tracking(head, n=6, seed=0) -> Tracking:
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(0, 0.1, s).astype(np.float32)  # noqa: E731
    return Tracking(shape=f(head.num_shape), expression=f(n, head.num_expression), joint_rotations=f(n, head.num_joints, 3), translation=f(n, 3),
                    K=np.repeat(np.eye(3, dtype=np.float32)[None], n, 0), R=np.repeat(np.eye(3, dtype=np.float32)[None], n, 0),
                    t=f(n, 3), extras={"lids": f(n, 2)})


def _same(a: FrameParams, b: FrameParams) -> bool:
    pairs = [(a.shape, b.shape), (a.expression, b.expression), (a.joint_rotations, b.joint_rotations), (a.translation, b.translation)]
    return all(torch.equal(x, y) for x, y in pairs) and a.extras.keys() == b.extras.keys() and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)


def test_host_and_device_tracking_give_the_same_params(head):
    tr = _tracking(head)
    idx = [4, 1, 1]
    host = tr.params(idx)
    dev = tr.on_device("cpu").params(torch.tensor(idx))
    assert isinstance(host, FrameParams) and isinstance(dev, FrameParams)
    assert host.batch_size == len(host) == 3 and _same(host, dev)
    assert torch.equal(host.expression[0], torch.as_tensor(tr.expression[4])) and torch.equal(host.extras["lids"][2], torch.as_tensor(tr.extras["lids"][1]))


def test_indexing_device_moves_and_the_older_dict_reads(head):
    p = _tracking(head).params(np.arange(6))
    one = p[2]
    assert one.batch_size == 1 and torch.equal(one.joint_rotations[0], p.joint_rotations[2])
    assert p[1:4].batch_size == 3 and torch.equal(p[torch.tensor([5, 0])].translation, p.translation[[5, 0]])
    assert _same(FrameParams.cat([p[:2], p[2:]]), p)
    moved = p.to("cpu")
    assert moved.device.type == "cpu" and _same(moved, p)
    c = p.clone()
    c.expression += 1
    assert not torch.equal(c.expression, p.expression)
    # transitional: the keys of the dicts FrameParams replaced
    assert p["expression"] is p.expression and p.get("extras") is p.extras and p.get("nope", 7) == 7
    assert _same(FrameParams.of({"shape": p.shape, "expression": p.expression, "joint_rotations": p.joint_rotations,
                                 "translation": p.translation, "extras": p.extras}), p)
    assert _same(FrameParams.of({**p}), p) and set(dict(p)) == {"shape", "expression", "joint_rotations", "translation", "extras"}
    with pytest.raises(KeyError):
        p["nope"]


def test_head_model_poses_frame_params_like_its_keywords(head):
    p = _tracking(head).params([0, 3])
    kw = head(shape=p.shape, expression=p.expression, joint_rotations=p.joint_rotations, translation=p.translation, extras=p.extras)
    assert torch.equal(head(p), kw)
    assert torch.equal(head({"shape": p.shape, "expression": p.expression, "joint_rotations": p.joint_rotations,
                             "translation": p.translation, "extras": p.extras}), kw)  # the older dict, for one release


def test_neutral_is_the_rest_pose(head):
    n = FrameParams.neutral(head, batch=2)
    assert n.batch_size == 2 and n.joint_rotations.shape == (2, head.num_joints, 3)
    assert torch.allclose(head(n), head.template[None].expand(2, -1, -1), atol=1e-6)
    tr = _tracking(head)
    canon = tr.neutral(3)
    assert torch.equal(canon.shape, torch.as_tensor(tr.shape)[None].expand(3, -1)) and not canon.expression.any()
    assert canon.extras["lids"].shape == (3, 2) and not canon.extras["lids"].any()


def test_cuda_graph_signature_holds_frame_params(head):
    from headavatar.utils.cudagraph import _flatten, _rebuild

    p = _tracking(head).params([0, 1])
    flat: list = []
    spec = _flatten((p,), flat)
    hash(spec)  # signatures are dict keys
    (back,) = _rebuild(spec, iter(flat))
    assert isinstance(back, FrameParams) and _same(back, p)
