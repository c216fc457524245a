"""The torch engine's data layers read ahead in a thread and give what reading in turn gives.

Shuffled, randomly cropped and mirrored ImageData batches come out the same,
in the same order, after a resume's skip too; an unreadable image fails the
batch that holds it, when that batch is asked for, not the one before.
"""

from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
import pytest

from caffe_ft.errors import CaffeFtError

pytestmark = pytest.mark.host

LAYER = """
name: "data" type: "ImageData" top: "data" top: "label"
transform_param { mirror: true crop_size: 10 mean_value: 100 scale: 0.5 }
image_data_param { source: "%s" batch_size: 3 shuffle: true new_height: 14 new_width: 14 }
"""


def _layer(tmp_path, schema, broken: int = -1):  # type: ignore[no-untyped-def]
    import cv2

    from caffe_ft.formats import prototext

    rng = np.random.default_rng(2)
    lines = []
    for index in range(7):  # not a multiple of the batch: the shuffled list wraps around mid-batch
        path = tmp_path / f"{index}.png"
        if index == broken:
            path.write_bytes(b"not an image")
        else:
            cv2.imwrite(str(path), rng.integers(0, 256, (16, 18, 3)).astype(np.uint8))
        lines.append(f"{path} {index % 3}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    text = LAYER % os.path.join(str(tmp_path), "list.txt")
    return prototext.to_message(prototext.parse(text.encode()), schema.new("LayerParameter"))


def _batches(layer, schema, prefetch: bool, skip: int, count: int) -> List[Dict[str, np.ndarray]]:  # type: ignore[no-untyped-def]
    from caffe_ft.training.torch.feed import NetFeeder

    feeder = NetFeeder([layer], schema, "TRAIN", prefetch=prefetch)
    feeder.skip(skip)
    return [feeder.next() for _ in range(count)]


@pytest.mark.parametrize("skip", [0, 2])
def test_read_ahead_gives_the_same_batches_in_the_same_order(tmp_path, schema, skip: int) -> None:  # type: ignore[no-untyped-def]
    layer = _layer(tmp_path, schema)
    ahead = _batches(layer, schema, True, skip, 6)
    in_turn = _batches(layer, schema, False, skip, 6)
    assert [sorted(batch) for batch in ahead] == [["data", "label"]] * 6
    for ours, theirs in zip(ahead, in_turn):
        np.testing.assert_array_equal(ours["data"], theirs["data"])
        np.testing.assert_array_equal(ours["label"], theirs["label"])
    # The batches differ from each other (shuffle, crops, mirrors): the comparison could fail.
    assert not np.array_equal(ahead[0]["data"], ahead[1]["data"])


def test_an_unreadable_image_fails_its_own_batch(tmp_path, schema) -> None:  # type: ignore[no-untyped-def]
    from caffe_ft.training.torch.feed import NetFeeder

    layer = _layer(tmp_path, schema, broken=5)
    plain = NetFeeder([layer], schema, "TRAIN")
    good = 0
    with pytest.raises(CaffeFtError):
        while True:
            plain.next()
            good += 1
    assert good >= 1  # the bad image is not in the first batch: "early" would show
    ahead = NetFeeder([layer], schema, "TRAIN", prefetch=True)
    for _ in range(good):
        ahead.next()  # the bad batch is being read already; its error waits for its turn
    with pytest.raises(CaffeFtError, match="cannot read this image"):
        ahead.next()
