"""An MP4 reader that shares no code with libav (ISO/IEC 14496-12 boxes): checks what a written file declares."""

from __future__ import annotations

import struct
from pathlib import Path

CONTAINER_BOXES = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}


def boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, bytes]]:
    """(type, payload) of the boxes in data[start:end], containers flattened in file order after their parent."""
    found, index, end = [], start, len(data) if end is None else end
    while index < end:
        size, kind = struct.unpack(">I4s", data[index : index + 8])
        header = 16 if size == 1 else 8
        size = struct.unpack(">Q", data[index + 8 : index + 16])[0] if size == 1 else size
        found.append((kind, data[index + header : index + size]))
        if kind in CONTAINER_BOXES:
            found += boxes(data, index + header, index + size)
        index += size
    return found


def mp4_tracks(path: Path) -> dict[str, dict]:
    """Per handler type ('vide', 'soun'): codec, sample count, sample durations, media and edit-list seconds."""
    data = path.read_bytes()
    top = [kind for kind, _ in boxes(data) if kind in (b"ftyp", b"moov", b"mdat")]
    assert top == [b"ftyp", b"moov", b"mdat"], top  # moov first: playable while downloading (+faststart)
    moov = next(payload for kind, payload in boxes(data) if kind == b"moov")
    movie_timescale = struct.unpack(">I", next(p for k, p in boxes(moov) if k == b"mvhd")[12:16])[0]
    tracks = {}
    for trak in (payload for kind, payload in boxes(moov) if kind == b"trak"):
        box = {kind: payload for kind, payload in boxes(trak)}  # one of each in these files
        handler = box[b"hdlr"][8:12].decode()
        timescale, duration = struct.unpack(">II", box[b"mdhd"][12:20])
        entries = struct.unpack(f">{2 * struct.unpack('>I', box[b'stts'][4:8])[0]}I", box[b"stts"][8:])
        segment, media_time = struct.unpack(">Ii", box[b"elst"][8:16])
        entry = box[b"stsd"][8:]
        tracks[handler] = {
            "codec": entry[4:8].decode(),
            "samples": struct.unpack(">I", box[b"stsz"][8:12])[0],
            "deltas": {entries[i + 1] / timescale for i in range(0, len(entries), 2)},
            "media_seconds": duration / timescale,
            "skip_seconds": media_time / timescale,  # the edit list starts here: B-frame reorder or encoder delay
            "edit_seconds": segment / movie_timescale,
            "sample_entry": entry,
        }
    return tracks


def avc_format(sample_entry: bytes) -> dict:
    """Profile, chroma format and bit depth from the avcC box of an avc1 sample entry."""
    avcc = next(payload for kind, payload in boxes(sample_entry, 8 + 78) if kind == b"avcC")
    index = 6 + 2 + struct.unpack(">H", avcc[6:8])[0]  # one SPS (x264)
    index += 1 + 2 + struct.unpack(">H", avcc[index + 1 : index + 3])[0]  # one PPS
    # High-profile extension (14496-15 5.3.3.1.2): chroma_format_idc, bit_depth_luma_minus8 in the low bits.
    return {"profile": avcc[1], "chroma_format_idc": avcc[index] & 3, "bit_depth": (avcc[index + 1] & 7) + 8}


def colour(sample_entry: bytes) -> tuple:
    colr = next(payload for kind, payload in boxes(sample_entry, 8 + 78) if kind == b"colr")
    assert colr[:4] == b"nclx"
    primaries, transfer, matrix, full_range = struct.unpack(">HHHB", colr[4:11])
    return primaries, transfer, matrix, full_range >> 7
