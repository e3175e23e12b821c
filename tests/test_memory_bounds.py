"""Peak memory follows the batch, not the data: image folders hold no per-image objects and read a
bounded sample for their statistics (the allocator side is measured in ``benchmarks/memory.py``)."""

from __future__ import annotations

import torch


def _write_images(root, count: int) -> None:
    from PIL import Image

    for index in range(count):
        (root / str(index % 2)).mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4), color=index % 256).save(root / str(index % 2) / f"{index:04d}.png")


def test_an_image_folder_holds_its_paths_in_one_array_not_an_object_per_image(tmp_path):
    import tracemalloc
    from pathlib import Path

    from kdistill.data import _image_folder

    _write_images(tmp_path, 400)
    _image_folder(tmp_path, None)  # PIL's plugins load on first use: not part of the measure
    tracemalloc.start()
    try:
        images = _image_folder(tmp_path, None)
        retained = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    longest = max(len(str(path)) for path in Path(tmp_path).rglob("*.png"))
    # A path's bytes and an 8-byte label an image, with slack for the object headers; a list of
    # Path objects and ints took ~350 bytes an image more than that.
    assert retained / len(images) < longest + 8 + 40, retained / len(images)
    image, label = images[len(images) - 1]  # the last of class "1": image 399, all pixels 399 mod 256
    assert label == 1
    torch.testing.assert_close(image, torch.full((1, 4, 4), 143 / 255))


def test_an_image_folder_reads_a_bounded_sample_for_its_statistics(tmp_path, monkeypatch):
    from PIL import Image

    import kdistill.data as data
    from kdistill.config import DataConfig

    _write_images(tmp_path, 80)
    monkeypatch.setattr(data, "STATISTICS_SAMPLE", 4)
    decoded = []
    convert = Image.Image.convert
    monkeypatch.setattr(Image.Image, "convert", lambda self, *a, **k: decoded.append(1) or convert(self, *a, **k))
    data.load_data(DataConfig(dataset="folder", path=str(tmp_path), augment="none"))
    # 16 items checked against the folder's labels, then the statistics sample and the checks of
    # three splits (4 each) and one sample per split for its shape: never all 80 images.
    assert len(decoded) <= 16 + 4 * 4 + 3, len(decoded)


def test_a_folder_is_identified_by_its_files_not_by_decoding_them(tmp_path, monkeypatch):
    import os

    from PIL import Image

    import kdistill.data as data
    from kdistill.cache import data_digest
    from kdistill.config import DataConfig

    _write_images(tmp_path, 40)

    def digests() -> tuple[str, str]:
        splits = data.load_data(DataConfig(dataset="folder", path=str(tmp_path), augment="none"))
        decoded.clear()
        found = data.splits_digest(splits), data_digest(splits.train)
        assert decoded == [], "a digest decoded images"
        return found

    decoded: list[int] = []
    convert = Image.Image.convert
    monkeypatch.setattr(Image.Image, "convert", lambda self, *a, **k: decoded.append(1) or convert(self, *a, **k))
    first = digests()
    assert digests() == first  # the same folder, loaded again
    # The same bytes written again, with another modification time: only the file's times tell.
    edited = tmp_path / "1" / "0001.png"
    edited.write_bytes(edited.read_bytes())
    os.utime(edited, ns=(1, 1))  # whatever the file system's clock granularity
    second = digests()
    assert second[0] != first[0] and second[1] != first[1]
