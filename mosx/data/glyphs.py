"""Letters of many writing systems, rendered from the Noto fonts that Debian ships.

Each script is a MOS group and each letter a class. A "family" is a typeface design such as
NotoSansDevanagari or NotoSerifDevanagari; its styles (weights, widths, italics) are its font
files. Train and test use disjoint families, so the test set measures generalisation to an unseen
design, not to another augmentation of a seen one.
"""

from __future__ import annotations

import math
import os
import struct
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from .errors import MissingDataError

# Where Debian's fonts-noto-core / fonts-noto-extra put their files.
DEFAULT_FONT_DIR = "/usr/share/fonts/truetype/noto"
FONT_PACKAGES = "fonts-noto-core fonts-noto-extra"

# (script, code point ranges, font family prefixes). Order matters: a build with S scripts uses the
# first S of ID_SCRIPTS, so smaller builds are subsets of larger ones. Every ID script has at least
# two typeface families, so train and test can use different ones.
_LGC_FAMILIES = ("NotoSans", "NotoSerif", "NotoSansDisplay", "NotoSerifDisplay", "NotoSansMono")
ID_SCRIPTS = (
    ("Latin", ((0x41, 0x5A), (0x61, 0x7A)), _LGC_FAMILIES),
    ("Devanagari", ((0x904, 0x939), (0x972, 0x97F)), ("NotoSansDevanagari", "NotoSerifDevanagari")),
    (
        "Arabic",
        ((0x621, 0x64A), (0x671, 0x6D3)),
        ("NotoSansArabic", "NotoKufiArabic", "NotoNaskhArabic", "NotoNastaliqUrdu"),
    ),
    ("Hebrew", ((0x5D0, 0x5EA),), ("NotoSansHebrew", "NotoSerifHebrew", "NotoRashiHebrew")),
    ("Thai", ((0xE01, 0xE2E),), ("NotoSansThai", "NotoSerifThai", "NotoLoopedThai")),
    ("Greek", ((0x391, 0x3A9), (0x3B1, 0x3C9)), _LGC_FAMILIES),
    ("Ethiopic", ((0x1200, 0x135A),), ("NotoSansEthiopic", "NotoSerifEthiopic")),
    ("Georgian", ((0x10D0, 0x10FA),), ("NotoSansGeorgian", "NotoSerifGeorgian")),
    ("Armenian", ((0x531, 0x556), (0x561, 0x586)), ("NotoSansArmenian", "NotoSerifArmenian")),
    ("Bengali", ((0x985, 0x9B9),), ("NotoSansBengali", "NotoSerifBengali")),
    ("Tamil", ((0xB85, 0xBB9),), ("NotoSansTamil", "NotoSerifTamil", "NotoSerifTamilSlanted")),
    ("Cyrillic", ((0x410, 0x44F),), _LGC_FAMILIES),
    ("Khmer", ((0x1780, 0x17B3),), ("NotoSansKhmer", "NotoSerifKhmer")),
    ("Gujarati", ((0xA85, 0xAB9),), ("NotoSansGujarati", "NotoSerifGujarati")),
    ("Myanmar", ((0x1000, 0x102A),), ("NotoSansMyanmar", "NotoSerifMyanmar")),
    ("Kannada", ((0xC85, 0xCB9),), ("NotoSansKannada", "NotoSerifKannada")),
    ("Sinhala", ((0xD85, 0xDC6),), ("NotoSansSinhala", "NotoSerifSinhala")),
    ("Gurmukhi", ((0xA05, 0xA39),), ("NotoSansGurmukhi", "NotoSerifGurmukhi")),
    ("Lao", ((0xE81, 0xEAE),), ("NotoSansLao", "NotoSerifLao", "NotoLoopedLao")),
    ("Telugu", ((0xC05, 0xC39),), ("NotoSansTelugu", "NotoSerifTelugu")),
    ("Malayalam", ((0xD05, 0xD3A),), ("NotoSansMalayalam", "NotoSerifMalayalam")),
    ("Balinese", ((0x1B05, 0x1B33),), ("NotoSansBalinese", "NotoSerifBalinese")),
)

# Scripts never used as ID classes: their letters form the near-OOD set ("held-out scripts").
# Fixed, so the OOD set is the same whatever the number of ID classes.
OOD_SCRIPTS = (
    ("Tibetan", ((0xF40, 0xF6C),), ("NotoSerifTibetan",)),
    ("Oriya", ((0xB05, 0xB39),), ("NotoSansOriya",)),
    ("Thaana", ((0x780, 0x7A5),), ("NotoSansThaana",)),
    ("Cherokee", ((0x13A0, 0x13F4),), ("NotoSansCherokee",)),
    ("CanadianAboriginal", ((0x1401, 0x166C),), ("NotoSansCanadianAboriginal",)),
    ("Cham", ((0xAA00, 0xAA28),), ("NotoSansCham",)),
    ("MeeteiMayek", ((0xABC0, 0xABE2),), ("NotoSansMeeteiMayek",)),
    ("OlChiki", ((0x1C5A, 0x1C77),), ("NotoSansOlChiki",)),
    ("Runic", ((0x16A0, 0x16EA),), ("NotoSansRunic",)),
    ("Glagolitic", ((0x2C00, 0x2C2E),), ("NotoSansGlagolitic",)),
    ("Vai", ((0xA500, 0xA60B),), ("NotoSansVai",)),
    ("Yi", ((0xA000, 0xA48C),), ("NotoSansYi",)),
    ("NKo", ((0x7CA, 0x7EA),), ("NotoSansNKo",)),
    ("Tifinagh", ((0x2D30, 0x2D67),), ("NotoSansTifinagh",)),
    ("Syriac", ((0x710, 0x72F),), ("NotoSansSyriac",)),
    ("Samaritan", ((0x800, 0x815),), ("NotoSansSamaritan",)),
    ("Osage", ((0x104B0, 0x104D3),), ("NotoSansOsage",)),
    ("Deseret", ((0x10400, 0x1044F),), ("NotoSansDeseret",)),
    ("Bamum", ((0xA6A0, 0xA6E5),), ("NotoSansBamum",)),
    ("Javanese", ((0xA984, 0xA9B2),), ("NotoSansJavanese",)),
    ("Adlam", ((0x1E900, 0x1E943),), ("NotoSansAdlam",)),
    ("Brahmi", ((0x11003, 0x11037),), ("NotoSansBrahmi",)),
    ("LinearB", ((0x10000, 0x1005D),), ("NotoSansLinearB",)),
    ("Sundanese", ((0x1B83, 0x1BA0),), ("NotoSansSundanese",)),
)

# Families that are one design in another optical size or slant: they always land on the same side
# of the train/test split, else "unseen family" would mean "the same letters, a bit bolder".
SAME_DESIGN = {
    "NotoSansDisplay": "NotoSans",
    "NotoSerifDisplay": "NotoSerif",
    "NotoSerifTamilSlanted": "NotoSerifTamil",
}


def design_of(family: str) -> str:
    return SAME_DESIGN.get(family, family)


# A letter whose normalised shape correlates above this with an already chosen letter is skipped:
# Latin A, Greek Alpha and Cyrillic A are one picture, so they cannot be three classes.
SIMILARITY_LIMIT = 0.85
TEMPLATE_SIZE = 16
RENDER_SIZE = 64  # glyphs are drawn large once per (font, letter), augmented, then shrunk


@dataclass(frozen=True)
class FontFile:
    path: str
    family: str  # typeface design, e.g. "NotoSerifDevanagari"
    style: str  # e.g. "CondensedBold"


@dataclass
class Script:
    name: str
    ranges: tuple
    families: dict = field(default_factory=dict)  # family -> [FontFile], styles sorted


def letter_codepoints(ranges) -> list[int]:
    """Assigned, undecomposed letters (Lu/Ll/Lo) in the ranges: no accented or nukta variants."""
    out = []
    for lo, hi in ranges:
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            if unicodedata.category(ch) in ("Lu", "Ll", "Lo") and not unicodedata.decomposition(ch):
                out.append(cp)
    return out


def _style_key(style: str):
    # Regular first, then the rest alphabetically: the first style is a family's reference face.
    return (style != "Regular", style)


def scan_fonts(font_dir: str | None, table) -> list[Script]:
    """Find each script's font files in font_dir; raises MissingDataError when none are there."""
    font_dir = font_dir or DEFAULT_FONT_DIR
    if not os.path.isdir(font_dir):
        raise MissingDataError(
            f"font folder {font_dir!r} does not exist; install the Noto fonts with "
            f"`apt-get install {FONT_PACKAGES}` (Debian/Ubuntu) or pass --font-dir"
        )
    by_family: dict[str, list[FontFile]] = {}
    for name in sorted(os.listdir(font_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in (".ttf", ".otf") or "-" not in stem:
            continue
        family, style = stem.split("-", 1)
        by_family.setdefault(family, []).append(FontFile(os.path.join(font_dir, name), family, style))
    scripts = []
    for name, ranges, families in table:
        s = Script(name, ranges)
        for fam in families:
            if fam in by_family:
                s.families[fam] = sorted(by_family[fam], key=lambda f: _style_key(f.style))
        scripts.append(s)
    if not any(s.families for s in scripts):
        raise MissingDataError(
            f"no Noto font files found in {font_dir!r}; install them with "
            f"`apt-get install {FONT_PACKAGES}` (Debian/Ubuntu) or pass --font-dir"
        )
    return scripts


class CharMap:
    """Which code points a font maps to a real glyph, read straight from its 'cmap' table.

    Reads only the table directory and one cmap subtable (format 12 preferred, else format 4), so
    it costs a fraction of a millisecond; fontTools also decodes glyph names, which is 30x slower.
    tests/test_data.py checks it against fontTools.
    """

    def __init__(self, path: str):
        import bisect

        self._bisect = bisect.bisect_left
        self.format = None
        with open(path, "rb") as f:
            data = f.read()
        if data[:4] == b"ttcf":  # a collection: use its first font
            data_off = struct.unpack(">I", data[12:16])[0]
        else:
            data_off = 0
        if len(data) < data_off + 12:
            raise ValueError(f"{path}: not a TrueType/OpenType font (too short)")
        num_tables = struct.unpack(">H", data[data_off + 4 : data_off + 6])[0]
        cmap_off = None
        for i in range(num_tables):
            rec = data_off + 12 + 16 * i
            tag, _, off, _ = struct.unpack(">4sIII", data[rec : rec + 16])
            if tag == b"cmap":
                cmap_off = off
        if cmap_off is None:
            raise ValueError(f"{path}: font has no 'cmap' table")
        n_sub = struct.unpack(">H", data[cmap_off + 2 : cmap_off + 4])[0]
        subs = {}
        for i in range(n_sub):
            plat, enc, off = struct.unpack(">HHI", data[cmap_off + 4 + 8 * i : cmap_off + 12 + 8 * i])
            fmt = struct.unpack(">H", data[cmap_off + off : cmap_off + off + 2])[0]
            subs[(plat, enc, fmt)] = cmap_off + off
        for want in (
            (3, 10, 12),
            (0, 4, 12),
            (0, 6, 12),
            (3, 1, 4),
            (0, 3, 4),
            (0, 4, 4),
            (0, 6, 4),
            (0, 1, 4),
            (0, 0, 4),
        ):
            if want in subs:
                self._parse(data, subs[want], want[2])
                return
        for (plat, enc, fmt), off in sorted(subs.items()):
            if fmt in (4, 12):
                self._parse(data, off, fmt)
                return
        raise ValueError(f"{path}: no Unicode cmap subtable of format 4 or 12")

    def _parse(self, data: bytes, off: int, fmt: int):
        self.format = fmt
        if fmt == 12:
            n = struct.unpack(">I", data[off + 12 : off + 16])[0]
            g = np.frombuffer(data, ">u4", 3 * n, off + 16).reshape(n, 3).astype(np.int64)
            self._start, self._end, self._glyph = g[:, 0].tolist(), g[:, 1].tolist(), g[:, 2].tolist()
            return
        seg = struct.unpack(">H", data[off + 6 : off + 8])[0] // 2
        arr = lambda k, dt: np.frombuffer(data, dt, seg, off + 14 + k * 2 * seg + (2 if k else 0))
        self._end = arr(0, ">u2").astype(np.int64).tolist()
        self._start = arr(1, ">u2").astype(np.int64).tolist()
        self._delta = arr(2, ">i2").astype(np.int64).tolist()
        self._range = arr(3, ">u2").astype(np.int64).tolist()
        self._range_pos = off + 16 + 6 * seg  # byte position of idRangeOffset[0]
        self._data = data

    def __contains__(self, cp: int) -> bool:
        i = self._bisect(self._end, cp)
        if i >= len(self._end) or cp < self._start[i]:
            return False
        if self.format == 12:
            return (self._glyph[i] + cp - self._start[i]) != 0
        if self._range[i] == 0:
            return (cp + self._delta[i]) & 0xFFFF != 0
        # idRangeOffset is a byte offset from its own slot into glyphIdArray
        pos = self._range_pos + 2 * i + self._range[i] + 2 * (cp - self._start[i])
        if pos + 2 > len(self._data):
            return False
        gid = struct.unpack(">H", self._data[pos : pos + 2])[0]
        return gid != 0 and (gid + self._delta[i]) & 0xFFFF != 0


class FontCache:
    """Opens fonts and reads their character maps once per build."""

    def __init__(self):
        self._cmaps: dict[str, object] = {}
        self._fonts: dict[str, object] = {}

    def cmap(self, path: str):
        if path not in self._cmaps:
            try:
                self._cmaps[path] = CharMap(path)
            except (OSError, ValueError, struct.error) as e:  # unreadable: it covers nothing
                import warnings

                warnings.warn(f"skipping unreadable font {path}: {e}")
                self._cmaps[path] = frozenset()
        return self._cmaps[path]

    def has(self, font: FontFile, cp: int) -> bool:
        return cp in self.cmap(font.path)

    def font(self, path: str):
        if path not in self._fonts:
            from PIL import ImageFont

            # BASIC layout: no shaping engine, so results do not depend on whether libraqm exists.
            self._fonts[path] = ImageFont.truetype(path, RENDER_SIZE, layout_engine=ImageFont.Layout.BASIC)
        return self._fonts[path]


def render_glyph(cache: FontCache, font: FontFile, cp: int):
    """The letter drawn white on black at RENDER_SIZE, cropped to its ink; None when blank."""
    from PIL import Image, ImageDraw

    f = cache.font(font.path)
    # canvas = the glyph's layout box plus a margin, so wide or overhanging glyphs are never cut
    x0, y0, x1, y1 = f.getbbox(chr(cp))
    pad = 4
    img = Image.new("L", (max(1, x1 - x0) + 2 * pad, max(1, y1 - y0) + 2 * pad), 0)
    ImageDraw.Draw(img).text((pad - x0, pad - y0), chr(cp), font=f, fill=255)
    box = img.getbbox()
    if box is None or box[2] - box[0] < 2 or box[3] - box[1] < 2:
        return None
    return img.crop(box)


def template(glyph) -> np.ndarray:
    """Shape signature for similarity tests: aspect-kept fit into a square, zero mean, unit norm."""
    from PIL import Image

    w, h = glyph.size
    s = TEMPLATE_SIZE / max(w, h)
    g = glyph.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    canvas = Image.new("L", (TEMPLATE_SIZE, TEMPLATE_SIZE), 0)
    canvas.paste(g, ((TEMPLATE_SIZE - g.size[0]) // 2, (TEMPLATE_SIZE - g.size[1]) // 2))
    v = np.asarray(canvas, dtype=np.float64).ravel()
    v = v - v.mean()
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def spread_order(m: int) -> list[int]:
    """0..m-1 in bit-reversed order: any prefix is spread evenly over the code point range."""
    if m <= 1:
        return list(range(m))
    bits = max(1, math.ceil(math.log2(m)))
    rev = lambda i: int(format(i, f"0{bits}b")[::-1], 2)
    return sorted(range(m), key=lambda i: (rev(i), i))


def reference_font(script: Script) -> FontFile:
    return next(iter(script.families.values()))[0]


def script_candidates(script: Script, cache: FontCache) -> list[int]:
    """Letters that every family of the script can draw (checked in each family's reference face)."""
    refs = [fonts[0] for fonts in script.families.values()]
    return [cp for cp in letter_codepoints(script.ranges) if all(cache.has(f, cp) for f in refs)]


def rank_letters(scripts: list[Script], cache: FontCache, limit: int, avoid=None):
    """Per script, up to `limit` letters in the order builds take them.

    Round-robin over scripts, each taking its next letter in spread order, skipping letters that
    look like one already taken (any script) or like a row of `avoid` (templates to keep clear of).
    Returns ({script: [code points]}, templates of every taken letter).
    """
    cands = {}
    for s in scripts:
        if not s.families:
            continue
        c = script_candidates(s, cache)
        cands[s.name] = [c[i] for i in spread_order(len(c))]
    ranked = {name: [] for name in cands}
    d = TEMPLATE_SIZE**2
    avoid = np.zeros((0, d)) if avoid is None else np.asarray(avoid, dtype=np.float64).reshape(-1, d)
    own = np.zeros((sum(min(limit, len(c)) for c in cands.values()), d))
    n_own = 0
    pos = {name: 0 for name in cands}
    ref = {s.name: reference_font(s) for s in scripts if s.families}
    active = list(cands)
    while active:
        nxt = []
        for name in active:
            lst = cands[name]
            while pos[name] < len(lst) and len(ranked[name]) < limit:
                cp = lst[pos[name]]
                pos[name] += 1
                g = render_glyph(cache, ref[name], cp)
                if g is None:
                    continue
                t = template(g)
                worst = max(float(np.max(avoid @ t, initial=-1.0)), float(np.max(own[:n_own] @ t, initial=-1.0)))
                if worst > SIMILARITY_LIMIT:
                    continue
                ranked[name].append(cp)
                own[n_own] = t
                n_own += 1
                break
            if pos[name] < len(lst) and len(ranked[name]) < limit:
                nxt.append(name)
        active = nxt
    return ranked, own[:n_own]


def augment(glyph, size: int, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """One augmented size x size uint8 image: random scale, aspect jitter, rotation and shift.

    One affine warp from the cropped glyph onto a 2x canvas, then a 2x2 box reduction (cheap
    antialiasing). strength=0 gives the glyph upright, centred, its longer side 0.8 * size.
    """
    from PIL import Image

    angle = math.radians(float(rng.uniform(-12, 12)) * strength)
    scale = 0.8 + float(rng.uniform(-0.15, 0.12)) * strength
    aspect = float(np.exp(rng.uniform(-0.15, 0.15) * strength))
    ux, uy = float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1))
    w, h = glyph.size
    c, s = math.cos(angle), math.sin(angle)
    # extent after the aspect stretch and rotation, then the uniform factor that fits scale * size
    ew, eh = abs(c) * w * aspect + abs(s) * h, abs(s) * w * aspect + abs(c) * h
    k = scale * size / max(ew, eh)
    # shift up to strength * size / 8, kept inside the frame
    room_x, room_y = max(0.0, (size - k * ew) / 2), max(0.0, (size - k * eh) / 2)
    cx = size / 2 + max(-room_x, min(room_x, ux * strength * size / 8))
    cy = size / 2 + max(-room_y, min(room_y, uy * strength * size / 8))
    # output (2x canvas) -> input: u = A^-1 R^-1 (p / 2 - centre) / k + glyph centre
    ss = 2.0
    a11, a12 = c / (aspect * k * ss), s / (aspect * k * ss)
    a21, a22 = -s / (k * ss), c / (k * ss)
    ox, oy = cx * ss, cy * ss
    coeffs = (a11, a12, w / 2 - a11 * ox - a12 * oy, a21, a22, h / 2 - a21 * ox - a22 * oy)
    big = glyph.transform((int(size * ss), int(size * ss)), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=0)
    return np.asarray(big.reduce(2), dtype=np.uint8)
