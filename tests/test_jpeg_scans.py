"""A progressive-JPEG decode bomb (thousands of tiny scans) is refused from its markers, before any decode.

Why: a JPEG's decode cost is scans x blocks, not bytes. 18,500 scans of 32 bytes, each an end-of-band
run over every block of a 4000x4000 frame, made a 655 KB file that took 30 s to decode even with draft
scaling: the drop folder decoded it twice and published it, and the stream worker's watchdog killed the
worker on it at every restart. ``streaming/image_probe.py`` caps scans at ``MAX_JPEG_SCANS``; every
image entry (drop folder, gateway, featurizers, serving) goes through that probe.
"""

from __future__ import annotations

import io
import os
import struct
import time
from pathlib import Path

import pytest
from PIL import Image

from ingest.exceptions import ImageValidationError
from ingest.images import accept
from streaming import image_probe
from streaming.config import Settings
from streaming.exceptions import FeatureValidationError, ImageProbeError
from streaming.features.image import ImageFeaturizer


def _progressive(side: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (side, side), 128 if mode == "L" else (120, 130, 140)).save(buf, "JPEG", progressive=True)
    return buf.getvalue()


def scan_bomb(extra_scans: int, side: int = 64) -> bytes:
    """A valid progressive JPEG plus ``extra_scans`` AC scans, each one end-of-band run over every block
    (a one-symbol Huffman table: code '0' = EOBRUN with 14 extra bits). libjpeg decodes every one."""
    base = _progressive(side)
    dht = b"\xff\xc4" + struct.pack(">H", 20) + bytes([0x11]) + bytes([1] + [0] * 15) + bytes([0xE0])
    runs = -(-(((side + 7) // 8) ** 2) // 32767)
    bits = ("0" + "1" * 14) * runs
    bits += "1" * (-len(bits) % 8)
    entropy = bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")
    sos = b"\xff\xda" + struct.pack(">H", 8) + bytes([1, 1, 0x01, 1, 63, 0, 0])
    return base[:-2] + dht + (sos + entropy) * extra_scans + b"\xff\xd9"


def _scans(data: bytes) -> int:
    return image_probe._jpeg_scan_count(data, 10**9)


def test_the_bomb_is_really_a_decodable_jpeg_of_that_many_scans() -> None:
    """The fixture is what it claims: Pillow decodes it whole (so only the cap refuses it)."""
    bomb = scan_bomb(150)
    assert _scans(bomb) == _scans(_progressive(64)) + 150
    with Image.open(io.BytesIO(bomb)) as img:
        img.load()
        assert img.size == (64, 64)


def test_more_scans_than_the_cap_is_refused_by_the_probe_and_the_limit_is_inclusive() -> None:
    own = _scans(_progressive(64))
    at_cap = scan_bomb(image_probe.MAX_JPEG_SCANS - own)
    assert image_probe.probe(at_cap).content_type == "JPEG"
    with pytest.raises(ImageProbeError, match=r"more than 100 scans") as err:
        image_probe.probe(scan_bomb(image_probe.MAX_JPEG_SCANS - own + 1))
    assert err.value.reason == "too_many_scans"


def test_ordinary_progressive_and_baseline_photos_pass() -> None:
    for data in (_progressive(300, "RGB"), _progressive(300), _progressive(300, "CMYK")):
        assert 1 < _scans(data) <= 20
        image_probe.probe(data, complete=True)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30)).save(buf, "JPEG")
    assert _scans(buf.getvalue()) == 1


def test_marker_bytes_inside_a_segment_are_not_counted_as_scans() -> None:
    """FF DA inside a comment (or an EXIF thumbnail) is segment payload: the quick count over the
    bytes overshoots, and the walk over the markers must find the real, small number."""
    base = _progressive(64)
    payload = b"\xff\xda" * 1000
    comment = b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload
    data = base[:2] + comment + base[2:]
    assert data.count(b"\xff\xda") > image_probe.MAX_JPEG_SCANS
    assert _scans(data) == _scans(base)
    image_probe.probe(data, complete=True)
    accept(data, "note.jpg")


def test_the_featurizer_and_ingestion_refuse_the_bomb_with_their_own_errors() -> None:
    bomb = scan_bomb(2000, side=4000)  # ~1 ms a scan with draft scaling: ~2 s a decode, twice in ingestion
    with pytest.raises(FeatureValidationError, match=r"ImageEvent\.data: .*more than 100 scans"):
        ImageFeaturizer().pixels(bomb, "JPEG")
    with pytest.raises(ImageValidationError) as err:
        accept(bomb, "photo.jpg")
    assert err.value.reason == "too_many_scans"


def test_the_drop_folder_rejects_the_bomb_with_its_reason(settings: Settings, tmp_path: Path) -> None:
    from ingest.images import ImageWatcher
    from streaming.producer import Publisher, header_dict
    from streaming.topics import dead_letter_topic
    from tests.helpers import read_topic

    watch = tmp_path / "drop"
    watch.mkdir()
    (watch / "bomb.jpg").write_bytes(scan_bomb(2000, side=4000))
    old = time.time() - 60
    os.utime(watch / "bomb.jpg", (old, old))
    with Publisher(settings) as pub:
        watcher = ImageWatcher(settings, pub, watch)
        watcher.run(follow=False)
        watcher.close()
    assert (watcher.published, watcher.rejected_count) == (0, 1)
    (dl,) = read_topic(settings, dead_letter_topic(settings, "image"), decode=False, expect=1)
    assert header_dict(dl.headers)["dl.source_reason"] == "too_many_scans"
    assert (watch / "rejected" / "bomb.jpg.reason").read_text().startswith("too_many_scans: JPEG holds more than")


@pytest.mark.parametrize("junk", [b"\x00", b"\x12\x34\x56", b"\xff\x00"])
def test_junk_between_segments_does_not_hide_the_scans_behind_it(junk: bytes) -> None:
    """libjpeg skips bytes that are no marker ("extraneous bytes before marker") and decodes every scan
    after them; a count that stopped at the junk let one byte hide thousands of scans."""
    bomb = scan_bomb(300)
    dht_end = bomb.index(b"\xff\xc4" + struct.pack(">H", 20)) + 22
    hidden = bomb[:dht_end] + junk + bomb[dht_end:]
    with Image.open(io.BytesIO(hidden)) as img:  # the decoder still reads them all
        img.load()
    assert _scans(hidden) == _scans(bomb)
    with pytest.raises(ImageProbeError) as err:
        image_probe.probe(hidden)
    assert err.value.reason == "too_many_scans"
