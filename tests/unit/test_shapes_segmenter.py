"""The Shapes World's SAM stand-in finds each subject exactly, through the pack's own SAM entry point."""

import numpy as np
import torch

from dynasyn.drafts import inner_point, mask_box, resegment
from dynasyn.sam import SubjectPrompt, segment
from dynasyn.shapes import identity as I
from dynasyn.shapes.segmenter import ShapesSegmenter


def _iou(a, b):
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    return (a & b).sum() / max(1, (a | b).sum())


def _prompts(masks, with_points=True):
    out = []
    for m in masks:
        y0, y1, x0, x1 = mask_box(m)
        p = inner_point(m) if with_points else None
        out.append(SubjectPrompt(box=(x0 - 2, y0 - 2, x1 + 2, y1 + 2), points=[p] if p else [], labels=[1] if p else []))
    return out


def test_segments_two_colour_subjects_from_boxes_and_points():
    ious = []
    for seed in range(12):
        scene, subjects, _ = I.sample_novel_scene(seed)
        image = torch.from_numpy(scene.image).float() / 255
        masks = [torch.from_numpy(m).float() for m in scene.masks]
        for points in (True, False):
            got = segment(ShapesSegmenter(), image, _prompts(masks, points))
            ious += [_iou(g, m) for g, m in zip(got, masks)]
    assert np.mean(ious) > 0.88 and np.min(ious) > 0.6, (np.mean(ious), np.min(ious))


def test_resegments_a_moved_subject_and_works_at_other_sizes():
    scene, subjects, _ = I.sample_novel_scene(3)
    image = torch.from_numpy(scene.image).float() / 255
    masks = torch.stack([torch.from_numpy(m).float() for m in scene.masks])
    shifted = torch.roll(masks, shifts=2, dims=2)  # the pasted silhouettes, 2 px off (as after GSA)
    found, kept = resegment(image, shifted, ShapesSegmenter())
    assert kept == [] and all(_iou(f, m) > 0.8 for f, m in zip(found, masks))
    big = torch.nn.functional.interpolate(image.permute(2, 0, 1)[None], size=(128, 128), mode="nearest")[0].permute(1, 2, 0)
    got = segment(ShapesSegmenter(), big, _prompts(torch.nn.functional.interpolate(masks[:, None], size=(128, 128))[:, 0]))
    assert got.shape == (2, 128, 128) and _iou(got[0, ::2, ::2], masks[0]) > 0.85


def test_pair_quality_tells_a_kept_subject_from_a_lost_one():
    scene, subjects, _ = I.sample_novel_scene(5)
    image = scene.image
    q = I.pair_quality(image, scene.masks, [0, 1], subjects)
    assert all(x["colors"] and x["on_subject"] > 0.75 for x in q), q
    plain = image.copy()
    plain[scene.masks[0] > 0.5] = plain[scene.masks[1] > 0.5][0]  # subject 1 painted over in one colour of subject 2
    q = I.pair_quality(plain, scene.masks, [0, 1], subjects)
    assert not q[0]["colors"] and q[0]["on_subject"] == 0.0 and q[1]["colors"]
    swapped = I.pair_quality(image, scene.masks[::-1], [0, 1], subjects)  # each mask on the other subject
    assert all(x["on_subject"] < 0.2 for x in swapped), swapped
