"""Names a DHAT program point by its first frame outside the standard library and the codec
helpers (DHAT names the allocating or copying function, which is rarely the interesting one)."""
import re

SKIP = ["library/core", "library/alloc", "reader.rs", "writer.rs", "decode.rs", "encode.rs"]


def site(pp, ftbl):
    for f in (ftbl[i] for i in pp["fs"][1:]):
        m = re.search(r": (.*?) \((.*?)\)$", f)
        if m and not any(x in m.group(2) for x in SKIP):
            return f"{m.group(1)[:80]} ({m.group(2)[-40:]})"
    return "?"
