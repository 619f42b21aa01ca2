#!/usr/bin/env python3
"""Reads a durable-ingest timeline (HOOKTRAIL_TIMELINE=FILE, see
src/store/sqlite_timeline.rs) and prints where a request's time goes, as
means per request (each batch weighted by its size), skipping the first and
last SKIP seconds (warm-up, drain).

    bench/timeline.py FILE [SKIP_S]
"""
import bisect
import statistics
import sys

path = sys.argv[1]
skip = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
B, S, R, W, C = [], [], [], None, []
for line in open(path):
    f = line.split()
    if not f:
        continue
    v = [int(x) for x in f[1:]]
    if f[0] == "B":
        B.append(v)
    elif f[0] == "S":
        S.append(v)
    elif f[0] == "R":
        R.append(v)
    elif f[0] == "W":
        W = v
    elif f[0] in ("C", "F"):
        C.append([f[0]] + v)
B = [b for b in B if b[0] > 0 and b[7] > 0]
if not B or not S:
    sys.exit("no batches or syncs in " + path)
t_lo = B[0][5] + skip * 1e6
t_hi = B[-1][5] - skip * 1e6
sync_of = {}
for s in S:
    covers, n = s[0], s[1]
    for seq in range(covers - n + 1, covers + 1):
        sync_of[seq] = s
rows = []
for b in B:
    seq, first, mean_q, recv, begin, end, n0, n, holds, hold_us = b
    s = sync_of.get(seq)
    if s is None or not (t_lo <= end <= t_hi):
        continue
    take, start, stop, done = s[2:6]
    rows.append((n, end - mean_q, recv - first, begin - recv, end - begin, hold_us, holds, start - end, stop - start, done - stop, s))


def wmean(k):
    tot = sum(r[0] for r in rows)
    return sum(r[0] * r[k] for r in rows) / tot


nreq = sum(r[0] for r in rows)
span = (rows[-1][2] if False else 0)
dur = (t_hi - t_lo) / 1e6
syncs = [s for s in S if t_lo <= s[3] <= t_hi]
fd = sorted(s[4] - s[3] for s in syncs)
print(f"window {dur:.1f} s: {nreq} requests in {len(rows)} commits, {len(syncs)} syncs")
print(f"  requests per commit: mean {nreq / len(rows):.1f}; commits per sync {len(rows) / max(1, len(syncs)):.2f}; "
      f"requests/s {nreq / dur:,.0f}; commits/s {len(rows) / dur:,.0f}")
held = [r for r in rows if r[6] > 0]
print(f"  commits that held for a free sync loop: {100 * len(held) / len(rows):.0f}%, "
      f"mean hold {statistics.mean([r[5] for r in held]) if held else 0:.0f} us")
print(f"  fdatasync under load: mean {statistics.mean(fd):.0f} us, p50 {fd[len(fd) // 2]} p90 {fd[int(len(fd) * 0.9)]} "
      f"p99 {fd[int(len(fd) * 0.99)]} max {fd[-1]}")
if len(syncs[0]) > 6:
    print(f"  of each fdatasync, waiting on a run queue (schedstat): mean {statistics.mean([s[6] for s in syncs]):.0f} us")
print("per request, mean (us), weighted by batch size:")
print(f"  queued -> COMMIT returned          {wmean(1):7.0f}")
print(f"    (oldest op) queued -> writer took {wmean(2):6.0f}")
print(f"    writer took -> BEGIN              {wmean(3):6.0f}")
print(f"    BEGIN -> COMMIT returned          {wmean(4):6.0f}  (of it holding for a free loop {wmean(5):.0f})")
print(f"  COMMIT -> its fdatasync starts      {wmean(7):7.0f}")
print(f"  fdatasync                           {wmean(8):7.0f}")
print(f"  fdatasync end -> answers handed on  {wmean(9):7.0f}")
if R:
    rr = [r for r in R if t_lo <= r[0] <= t_hi]
    # answers handed to the responder (sync's done) -> responder took them: approximate by pairing in order
    # The responder takes commits' answers in the order the sync loops handed
    # them on: a sync's first commit is the next responder run after it.
    rr_all = sorted(r[0] for r in R)
    lag, k = [], 0
    for s in sorted(S, key=lambda s: s[5]):
        if k < len(rr_all) and t_lo <= s[5] <= t_hi:
            lag.append(rr_all[k] - s[5])
        k += s[1]
    if lag:
        print(f"  answers handed on -> responder task runs: mean {statistics.mean(lag):.0f} us, p50 {sorted(lag)[len(lag) // 2]} "
              "(syncs and responder runs paired in order)")
    print(f"  responder: per commit, recv -> all woken {statistics.mean([r[1] - r[0] for r in rr]):.0f} us ({len(rr)} commits)")
if W:
    print(f"  all urgent writes: queued -> caller's task runs again: {W[1] / max(1, W[0]):.0f} us mean over {W[0]} (whole run)")

cc = [c for c in C if t_lo <= c[1] <= t_hi]
if cc:
    for kind, what in (("C", "checkpointer passes"), ("F", "writer's finishing checkpoints")):
        k = [c for c in cc if c[0] == kind]
        if k:
            print(f"  {what}: {len(k) / dur:.1f}/s, mean {statistics.mean([c[2] - c[1] for c in k]):.0f} us, "
                  f"busy {100 * sum(c[2] - c[1] for c in k) / (dur * 1e6):.0f}% of the time, mean log {statistics.mean([c[3] for c in k]):.0f} frames")
    iv = sorted((c[1], c[2]) for c in cc)
    def overlaps(a, b):
        i = bisect.bisect_left(iv, (b, 10**18)) - 1
        while i >= 0 and iv[i][0] < b:
            if iv[i][1] > a:
                return True
            i -= 1
            if i < len(iv) - 50:
                break
        return False
    ov = [s[4] - s[3] for s in syncs if overlaps(s[3], s[4])]
    no = [s[4] - s[3] for s in syncs if not overlaps(s[3], s[4])]
    if ov and no:
        print(f"  fdatasync overlapping a checkpoint: {len(ov)} syncs, mean {statistics.mean(ov):.0f} us; "
              f"not: {len(no)}, mean {statistics.mean(no):.0f} us")
