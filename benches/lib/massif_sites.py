"""The heap of two massif detailed snapshots, and their difference by allocating call site: each
allocation is charged to its first frame outside the allocator, the standard library and the
buffer types (which name the allocating function, rarely the interesting one)."""
import collections
import re

DULL = re.compile(
    r"library/(alloc|core|std)|bytes_mut|bytes\.rs|raw_vec|hashbrown|alloc::|UnknownInlinedFun"
    r"|spec_from|<alloc|smallvec|below massif"
)


def heap(path):
    """(heap bytes, allocator overhead bytes) of a snapshot file."""
    t = open(path).read()
    return (int(re.search(r"mem_heap_B=(\d+)", t).group(1)),
            int(re.search(r"mem_heap_extra_B=(\d+)", t).group(1)))


def sites(path):
    """Heap bytes by call site in a detailed snapshot."""
    out = collections.Counter()
    stack = []  # (indent, charged above)
    for line in open(path).read().split("\n"):
        m = re.match(r"^(\s*)n\d+: (\d+) (.*)$", line)
        if not m:
            continue
        ind, size, frame = len(m.group(1)), int(m.group(2)), m.group(3)
        while stack and stack[-1][0] >= ind:
            stack.pop()
        charged = any(s[1] for s in stack)
        if ind > 0 and not charged and not DULL.search(frame):
            out[re.sub(r"0x[0-9A-F]+: ", "", frame)[:100]] += size
            stack.append((ind, True))
        else:
            stack.append((ind, charged))
    return out


def difference(before, after):
    """Sites sorted by how much more `after` holds than `before`."""
    a, b = sites(before), sites(after)
    return sorted(((k, b[k] - a[k]) for k in set(a) | set(b)), key=lambda kv: -abs(kv[1]))
