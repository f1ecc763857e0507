"""Masks: one image's class ids at its own size, from the model's logits, with their counts and PNG.

The mask is what torchvision's model and the usual post-processing give: the logits at the model's stride
interpolated bilinearly (``align_corners=False``) to its working size (the model's last layer), then to the
image's own size, then softmax and threshold when asked, then the arg-max. Both interpolations are linear
maps along rows and columns, so they compose into one map per axis (``AxisMap``) from the logits (about
33 x 44 for a 640 x 480 image) straight to the image's pixels; the working-size scores are never made.

The columns are interpolated first, for each logits row (``along_rows``: small), then the rows, as torch
does. Across rows each output pixel is a convex mix of at most three of those interpolated points, and a
convex mix decides most pixels without being computed (``decide``):
- where the points share one top class, the mix has that class (each class's lead over another is a mix of
  leads that are all >= 0);
- its probability is at least the smallest of theirs (the log-sum-exp is convex), and at most
  1 / sum_c exp(min over the points of z_c - z_top) (each exponent of the mix is at least that minimum).
So a threshold blanks or keeps whole runs of pixels from a few numbers per logits point, and only the
pixels near a border between classes, or whose probability is near the threshold, are computed
(``exact``). Output rows go in bands, so that no float tensor of a band exceeds ``BAND_BYTES`` whatever the
image's size.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

# The most bytes one float tensor of a band of output rows may take: small enough that a 25 MP image stays
# within the memory bound (catalog.MEMORY_BOUND_MB), large enough that a band's fixed cost is small.
BAND_BYTES = 8 << 20
# zlib's fastest level: measured on a 640x480 mask, 0.6 ms and 8-15 KB, against 1.4-2.1 ms and 5-9 KB at
# level 6; the bytes cost less to move than the milliseconds to save them.
PNG_COMPRESS_LEVEL = 1
# The most scores computed pixel by pixel in one step: 1 MB, so that the several passes over them run in
# the core's cache (on 2 cores, chunks of 1 MB took 0.6 of the time of one 8 MB step).
CHUNK = 1 << 18
# Up to this many logits columns (the model's stride: 44 for a 640 x 480 image), interpolating along rows
# is one matrix product; wider (logits at the input's size), a product would cost a multiply per column.
DENSE_COLUMNS = 128
# The lowest a class's score minus the top one's goes before exp. Below about -87, exp in float32 is subnormal
# or 0, and the CPU's vector exp takes 7-13 times as long for those (measured: 1.8 ms against 0.14 for 161k
# scores; random weights put most gaps there). exp(-80) is 2e-35: no sum that holds the top's exp(0) = 1
# can tell it from 0, so the probabilities are the same.
LOWEST_GAP = -80.0


@dataclass(frozen=True)
class AxisMap:
    """A linear map along one axis: output index ``i`` is ``sum_k weight[i, k] * input[start[i] + k]``,
    the weights >= 0 and summing to 1 (a convex mix); an index past the input's end has weight 0."""

    start: torch.Tensor  # (outputs,) int64, non-decreasing
    weight: torch.Tensor  # (outputs, taps) float32
    inputs: int

    def index(self, tap: int) -> torch.Tensor:
        return (self.start + tap).clamp_max(self.inputs - 1)

    def dense(self) -> torch.Tensor:
        """The map as a matrix (outputs x inputs), for devices where one matrix product beats many steps."""
        matrix = self.weight.new_zeros(len(self.start), self.inputs)
        for tap in range(self.weight.shape[1]):
            matrix.scatter_add_(1, self.index(tap)[:, None], self.weight[:, tap : tap + 1])
        return matrix


def bilinear(outputs: int, inputs: int, device: torch.device | str = "cpu") -> AxisMap:
    """``F.interpolate(..., mode="bilinear", align_corners=False)`` along one axis: output pixel centres
    mapped back onto the input, in float32 as torch computes them."""
    scale = torch.tensor(inputs, dtype=torch.float32, device=device) / outputs
    source = ((torch.arange(outputs, dtype=torch.float32, device=device) + 0.5) * scale - 0.5).clamp_min(0)
    first = source.to(torch.int64).clamp_max(inputs - 1)  # floor, since source >= 0
    lambda1 = (source - first).clamp(0, 1)
    # At the last input the second tap is the first again (torch clamps it): its weight joins the first's.
    at_end = first == inputs - 1
    weight = torch.stack([torch.where(at_end, 1.0, 1 - lambda1), torch.where(at_end, 0.0, lambda1)], 1)
    return AxisMap(first, weight, inputs)


def compose(inner: AxisMap, outer: AxisMap) -> AxisMap:
    """``outer`` after ``inner``: from ``inner``'s inputs to ``outer``'s outputs, tap by tap."""
    middle = torch.stack([outer.index(k) for k in range(outer.weight.shape[1])], 1)  # outputs x outer taps
    sources = inner.start[middle][..., None] + torch.arange(inner.weight.shape[1], device=middle.device)
    weights = outer.weight[..., None] * inner.weight[middle]  # outputs x outer taps x inner taps
    start = sources[:, 0, 0]  # the smallest: starts do not decrease
    offsets = (sources.clamp_max(inner.inputs - 1) - start[:, None, None]).flatten(1)
    weight = weights.new_zeros(len(start), int(offsets.max()) + 1)
    weight.scatter_add_(1, offsets, weights.flatten(1))
    taps = int(weight.ne(0).any(0).nonzero().max()) + 1  # trailing taps that only zero weights reach go
    return AxisMap(start, weight[:, :taps].contiguous(), inner.inputs)


def input_map(own: int, batch: int, logits: int, device: torch.device) -> AxisMap | None:
    """From an image's logits to its part of the model's input along one axis: the model's last layer,
    which logits shorter than the input are before; None for logits at the input's size. The image is the
    first ``own`` of the input's ``batch`` pixels (fewer when the batch was padded to a larger image)."""
    if logits == batch:
        return None
    to_input = bilinear(batch, logits, device)
    return AxisMap(to_input.start[:own], to_input.weight[:own], logits)


def part(axis: AxisMap, begin: int, end: int) -> AxisMap:
    return AxisMap(axis.start[begin:end], axis.weight[begin:end], axis.inputs)


@dataclass(frozen=True)
class RowGroups:
    """Runs of output rows that mix the same rows of points (a group's ``support``, its first ``taps``
    slots; the other slots repeat its first row, with weight 0); ``group[i]`` is row ``i``'s."""

    group: torch.Tensor  # (rows,) int64
    first: torch.Tensor  # (groups,) the first row of each
    stop: torch.Tensor  # (groups,) the row after the last of each
    taps: torch.Tensor  # (groups,) how many rows of points each mixes
    support: torch.Tensor  # (groups, slots) rows of points
    slot_weight: torch.Tensor  # (rows, slots) row i's weight for each of its group's support rows

    @classmethod
    def of(cls, rows: AxisMap) -> RowGroups:
        used = rows.weight > 0
        # The taps a row uses, first, in order (a stable sort of "unused" puts them there).
        order = (~used).to(torch.uint8).sort(dim=1, stable=True).indices
        taps = used.sum(1)
        slot_used = torch.arange(used.shape[1]) < taps[:, None]
        support = torch.where(slot_used, rows.start[:, None] + order, rows.start[:, None] + order[:, :1])
        new = torch.ones(len(support), dtype=torch.bool)
        new[1:] = (support[1:] != support[:-1]).any(1)
        first = new.nonzero()[:, 0]
        stop = torch.cat([first[1:], torch.tensor([len(support)])])
        slot_weight = torch.where(slot_used, rows.weight.gather(1, order), 0.0)
        support = support[first].clamp_max(rows.inputs - 1)
        return cls(new.cumsum(0) - 1, first, stop, taps[first], support, slot_weight)


def full_size_mask(
    logits: torch.Tensor,
    height: int,
    width: int,
    threshold: float = 0.0,
    *,
    batch_size: tuple[int, int] | None = None,
    own_size: tuple[int, int] | None = None,
    band_rows: int | None = None,
    dense: bool | None = None,
) -> np.ndarray:
    """The class-id mask (uint8, ``height`` x ``width``) of one image's logits (classes x h x w): the
    model's output interpolated bilinearly to the image's size, then softmax and ``threshold`` when asked
    (pixels whose top probability is below it become 0), then arg-max.

    The logits are at the input's size, or at the model's stride before its last upsampling; the input is
    ``batch_size`` (h, w), of which the image is the top-left ``own_size`` (both the logits' own size by
    default: an unpadded batch whose logits are at the input's size). On a GPU (``dense`` by default off
    the CPU) the same maps run as matrix products (``dense_mask``): there one product of every pixel's
    scores costs less than the many small steps that avoid most of them."""
    classes, logits_h, logits_w = logits.shape
    batch_h, batch_w = batch_size or (logits_h, logits_w)
    own_h, own_w = own_size or (batch_h, batch_w)
    to_input_rows = input_map(own_h, batch_h, logits_h, logits.device)
    to_input_cols = input_map(own_w, batch_w, logits_w, logits.device)
    to_image_rows, cols = bilinear(height, own_h, logits.device), bilinear(width, own_w, logits.device)
    if to_input_cols is not None:
        cols = compose(to_input_cols, cols)
    step = band_rows or max(1, BAND_BYTES // (width * classes * 4))
    if dense if dense is not None else logits.device.type != "cpu":
        rows = to_image_rows if to_input_rows is None else compose(to_input_rows, to_image_rows)
        return dense_mask(logits.float(), rows, cols, threshold, step)
    # The rows whose scores are made for every column (the points): the logits', whose runs of output
    # rows are long and few; but for an image taller than its input the input's, or a border between two
    # classes would cost each column a run of (image's / logits' rows) pixels to compute.
    if to_input_rows is not None and height <= own_h:
        to_image_rows, to_input_rows = compose(to_input_rows, to_image_rows), None
    groups = RowGroups.of(to_image_rows)
    along = AlongRows(logits.float(), cols)
    log_threshold = math.log(threshold) if threshold > 0 else None
    mask = np.empty((height, width), dtype=np.uint8)
    for begin in range(0, height, step):
        end = min(begin + step, height)
        mask[begin:end] = band_mask(along, to_input_rows, groups, begin, end, log_threshold).numpy()
    return mask


class AlongRows:
    """Logits rows (classes x rows x output columns) interpolated along each row to the output's columns,
    each made once: the bands move down the image, so only the rows from the current band's on are kept.
    From a few dozen logits columns (the model's stride) one matrix product makes them, else tap by tap
    (a product would cost a multiply per logits column)."""

    def __init__(self, logits: torch.Tensor, cols: AxisMap) -> None:
        self.logits, self.cols = logits, cols
        self.matrix = cols.dense().T if cols.inputs <= DENSE_COLUMNS else None
        self.first = 0
        self.block = logits.new_empty(logits.shape[0], 0, len(cols.start))

    def rows(self, first: int, stop: int) -> torch.Tensor:
        made = self.first + self.block.shape[1]
        kept = self.block[:, max(0, first - self.first) :]
        if stop > made:
            kept = torch.cat([kept, self.make(max(first, made), stop)], 1)
        self.first, self.block = first, kept
        return kept[:, : stop - first]

    def make(self, first: int, stop: int) -> torch.Tensor:
        logits = self.logits[:, first:stop, : self.cols.inputs]  # the image's own, in a padded batch
        if self.matrix is not None:
            return torch.matmul(logits, self.matrix)
        mixed = logits.index_select(2, self.cols.index(0)) * self.cols.weight[:, 0]
        for tap in range(1, self.cols.weight.shape[1]):
            mixed += logits.index_select(2, self.cols.index(tap)) * self.cols.weight[:, tap]
        return mixed


def point_rows(along: AlongRows, to_points: AxisMap | None, first: int, stop: int) -> torch.Tensor:
    """Rows ``first`` to ``stop`` of points (classes x rows x output columns): logits rows, or the rows
    ``to_points`` mixes of them."""
    if to_points is None:
        return along.rows(first, stop)
    needed = part(to_points, first, stop)
    low, high = int(needed.start[0]), int(needed.index(needed.weight.shape[1] - 1)[-1]) + 1
    return across_rows(along.rows(low, high), needed, low)


def across_rows(block: torch.Tensor, rows: AxisMap, first: int) -> torch.Tensor:
    """A block of rows (classes x rows x columns) whose first is row ``first``, mixed as ``rows`` says."""
    mixed = block.index_select(1, rows.index(0) - first) * rows.weight[:, 0, None]
    for tap in range(1, rows.weight.shape[1]):
        mixed += block.index_select(1, rows.index(tap) - first) * rows.weight[:, tap, None]
    return mixed


def band_mask(
    along: AlongRows,
    to_points: AxisMap | None,
    groups: RowGroups,
    begin: int,
    end: int,
    log_threshold: float | None,
) -> torch.Tensor:
    """The mask's rows ``begin`` to ``end`` (uint8): decided run by run where the bounds allow, the rest
    computed pixel by pixel."""
    first_group, last_group = int(groups.group[begin]), int(groups.group[end - 1])
    support = groups.support[first_group : last_group + 1]
    low, high = int(support.min()), int(support.max()) + 1
    block = point_rows(along, to_points, low, high)  # classes x rows of points x output columns
    support = support - low
    label, decided = decide(block, support, log_threshold)
    band_groups = groups.group[begin:end] - first_group
    mask = label.index_select(0, band_groups)
    undecided = (~decided).nonzero()
    if len(undecided):
        exact(mask, block, support, groups, undecided, first_group, begin, end, log_threshold)
    return mask


def decide(
    points: torch.Tensor, support: torch.Tensor, log_threshold: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each group of rows and output column: the label its pixels all have, and whether that holds
    for all of them (the bounds in the module's docstring)."""
    top, labels = points.max(0)  # logits rows x columns
    at_support = labels.to(torch.uint8)[support]  # groups x taps x columns
    label = at_support[:, 0]
    decided = (at_support == label[:, None]).all(1)
    if log_threshold is None:
        return label, decided
    gaps = (points - top).clamp_min_(LOWEST_GAP)  # each class's score minus the top one's, <= 0
    log_confidence = -torch.logsumexp(gaps, 0)
    keep = decided & (log_confidence[support].amin(1) >= log_threshold)
    group, column = (decided & ~keep).nonzero().unbind(1)  # one top class, a probability unsure so far
    width = points.shape[2]
    at_support = gaps.flatten(1)[:, support[group] * width + column[:, None]]  # classes x pairs x taps
    highest = -torch.logsumexp(at_support.amin(2), 0)  # each class at its smallest gap
    blank = torch.zeros_like(keep)
    blank[group[highest < log_threshold], column[highest < log_threshold]] = True
    return torch.where(blank, 0, label), keep | blank


def exact(
    mask: torch.Tensor,
    points: torch.Tensor,
    support: torch.Tensor,
    groups: RowGroups,
    undecided: torch.Tensor,
    first_group: int,
    begin: int,
    end: int,
    log_threshold: float | None,
) -> None:
    """Compute the pixels of the ``undecided`` (group, column) pairs into ``mask`` (the band's rows): pairs
    whose groups have as many rows in the band and mix as many logits rows together, in chunks of at most
    ``CHUNK`` scores."""
    classes, _, width = points.shape
    group, column = undecided.unbind(1)
    row_first = groups.first[group + first_group].clamp_min(begin)
    counts = groups.stop[group + first_group].clamp_max(end) - row_first
    slots = support.shape[1]
    kinds = counts * (slots + 1) + groups.taps[group + first_group]  # 1-D: torch.unique is quick there
    flat = points.reshape(classes, -1)
    for kind in torch.unique(kinds).tolist():
        count, used = divmod(kind, slots + 1)
        for pairs in (kinds == kind).nonzero()[:, 0].split(max(1, CHUNK // (classes * count))):
            rows = row_first[pairs, None] + torch.arange(count)  # pairs x count
            at_rows = support[group[pairs]] * width + column[pairs, None]  # pairs x slots
            scores = flat.index_select(1, at_rows[:, 0])[:, :, None] * groups.slot_weight[rows, 0]
            for tap in range(1, used):
                at_tap = flat.index_select(1, at_rows[:, tap])[:, :, None]
                scores.addcmul_(at_tap, groups.slot_weight[rows, tap])
            targets = (rows - begin) * width + column[pairs, None]
            mask.view(-1)[targets.flatten()] = pixel_labels(scores, log_threshold).flatten()


def pixel_labels(scores: torch.Tensor, log_threshold: float | None) -> torch.Tensor:
    """Class ids (uint8) of pixels' scores (classes first), 0 where the top probability is below the
    threshold."""
    top, labels = scores.max(0)  # the first of tied classes, as torch.argmax
    if log_threshold is None:
        return labels.to(torch.uint8)
    total = scores.sub_(top).clamp_min_(LOWEST_GAP).exp_().sum(0)  # 1 / the top probability
    return torch.where(total * math.exp(log_threshold) > 1, 0, labels).to(torch.uint8)


def dense_mask(
    logits: torch.Tensor, rows: AxisMap, cols: AxisMap, threshold: float, band_rows: int
) -> np.ndarray:
    """The same mask from every pixel's scores, as matrix products on the logits' device, in bands."""
    # The image's own logits (the top-left ones, in a padded batch), interpolated along the rows.
    across = torch.matmul(logits[:, : rows.inputs, : cols.inputs], cols.dense().T)
    row_matrix = rows.dense()
    bands = []
    for begin in range(0, len(row_matrix), band_rows):
        scores = torch.matmul(row_matrix[begin : begin + band_rows], across)  # classes x rows x columns
        log_threshold = math.log(threshold) if threshold > 0 else None
        bands.append(pixel_labels(scores, log_threshold).cpu())
    return torch.cat(bands).numpy()


def class_counts(mask: np.ndarray, classes: int) -> np.ndarray:
    """Pixels per class id, counted in bands (bincount widens its input to 8 bytes a pixel)."""
    counts = np.zeros(classes, dtype=np.int64)
    step = max(1, BAND_BYTES // (8 * max(1, mask.shape[1])))
    for start in range(0, mask.shape[0], step):
        counts += np.bincount(mask[start : start + step].ravel(), minlength=classes)[:classes]
    return counts


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB triples), so a mask PNG can be looked at as it is."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def mask_png(mask: np.ndarray, palette: list[int]) -> bytes:
    """The mask as a palettised PNG: its pixel values are the class ids, its colours VOC's."""
    picture = Image.fromarray(mask)
    picture.putpalette(palette)  # mode L -> P: pixel values stay the class ids
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()
