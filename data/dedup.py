"""Duplicate removal: exact (after normalising) and near-duplicate (MinHash + LSH), in numpy.

Exact duplicates differ only in case, punctuation or spacing: we hash the normalised text.

Near duplicates ("Give three tips for staying healthy." / "Give 3 tips for staying healthy!")
are pairs whose *word shingle sets* overlap a lot. Their Jaccard similarity
J(A, B) = |A ∩ B| / |A ∪ B| is what we threshold, but comparing all N²/2 pairs is too slow, so:

1. **MinHash.** Hash each shingle to a 32-bit integer x, then apply P random maps
   h_k(x) = ((a_k·x + b_k) mod 2^64) >> 32 ("multiply-add-shift" universal hashing: uint64
   arithmetic wraps for free, so no slow modulo by a prime). The signature is the P minima
   over the record's shingles: sig (N, P). For one random map, P(min over A == min over B)
   ≈ J(A, B), so the fraction of equal signature entries estimates J.
2. **LSH banding.** Cut the P entries into b bands of r rows (b·r = P). Two records become a
   *candidate* if some band is identical in both: probability 1 - (1 - J^r)^b, an S-curve whose
   steep part sits near J ≈ (1/b)^(1/r). We pick (b, r) so that point is the threshold, then
   confirm each candidate with the estimated J (no false positive from banding survives).
3. **Clusters.** Confirmed pairs are joined with union-find; each cluster keeps one record:
   the first, or the best by a score (e.g. the longest answer). Every other record is reported
   with the index it duplicates and the estimated similarity.
"""
from __future__ import annotations

import re
import zlib

import numpy as np
from tqdm import tqdm


def normalize_text(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: what 'exactly the same' means."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def exact_duplicates(texts: list[str]) -> list[int | None]:
    """For each text, the index of the first earlier text with the same normalised form."""
    first: dict[str, int] = {}
    out: list[int | None] = []
    for i, t in enumerate(texts):
        key = normalize_text(t)
        out.append(first.get(key))
        first.setdefault(key, i)
    return out


def shingles(text: str, ngram: int = 3) -> list[int]:
    """CRC32 hashes (32 bits) of the word n-grams of the normalised text (the text itself if short)."""
    words = normalize_text(text).split()
    grams = [" ".join(words[i : i + ngram]) for i in range(max(len(words) - ngram + 1, 1))]
    return [zlib.crc32(g.encode()) for g in grams]


def minhash_signatures(texts: list[str], num_perm: int = 128, ngram: int = 3, seed: int = 0) -> np.ndarray:
    """MinHash signatures, (N, num_perm) uint32, computed in chunks of documents whose shingles
    are hashed all at once."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)   # odd multipliers
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    sig = np.empty((len(texts), num_perm), dtype=np.uint32)
    docs_per_chunk = 256
    for lo in tqdm(range(0, len(texts), docs_per_chunk), desc="minhash", unit="chunk", leave=False, disable=None):
        per_doc = [shingles(t, ngram) for t in texts[lo:lo + docs_per_chunk]]
        lengths = np.array([len(s) for s in per_doc], dtype=np.int64)
        flat = np.fromiter((h for s in per_doc for h in s), dtype=np.uint64, count=int(lengths.sum()))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])                 # each doc's first shingle
        with np.errstate(over="ignore"):  # the wrap-around is the mod 2^64
            hashed = ((flat[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)).astype(np.uint32)  # (shingles, P)
        sig[lo:lo + len(per_doc)] = np.minimum.reduceat(hashed, starts, axis=0)
    return sig


def choose_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands·rows == num_perm whose S-curve midpoint (1/b)^(1/r) is nearest the threshold."""
    options = [(b, num_perm // b) for b in range(1, num_perm + 1) if num_perm % b == 0]
    return min(options, key=lambda br: abs((1 / br[0]) ** (1 / br[1]) - threshold))


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def near_duplicates(texts: list[str], threshold: float = 0.7, num_perm: int = 128, ngram: int = 3,
                    seed: int = 0, scores: list[float] | None = None) -> list[tuple[int, float] | None]:
    """For each text: None if kept, else (index of the kept member of its cluster, estimated J).

    Without `scores` the first record of a cluster is kept; with them, the highest score
    (ties: the earliest).
    """
    n = len(texts)
    if n == 0:
        return []
    sig = minhash_signatures(texts, num_perm, ngram, seed)
    bands, rows = choose_bands(threshold, num_perm)
    uf = _UnionFind(n)
    weights = np.random.default_rng(seed + 1).integers(1, 2**63, size=rows, dtype=np.uint64)
    for band in range(bands):
        with np.errstate(over="ignore"):  # one 64-bit key per record for this band
            keys = (sig[:, band * rows : (band + 1) * rows].astype(np.uint64) * weights).sum(axis=1)
        group = np.unique(keys, return_inverse=True)[1]
        first = np.full(group.max() + 1, n, dtype=np.int64)
        np.minimum.at(first, group, np.arange(n))            # the first record of each bucket
        i = np.nonzero(first[group] != np.arange(n))[0]      # records that share a bucket
        j = first[group[i]]
        # confirm candidates with the full-signature estimate (banding alone has false positives)
        sim = (sig[i] == sig[j]).mean(axis=1)
        for a, b in zip(i[sim >= threshold].tolist(), j[sim >= threshold].tolist()):
            uf.union(a, b)
    clusters: dict[int, list[int]] = {}
    for i in range(n):
        clusters.setdefault(uf.find(i), []).append(i)
    out: list[tuple[int, float] | None] = [None] * n
    for members in clusters.values():
        keep = members[0] if scores is None else max(members, key=lambda i: (scores[i], -i))
        for i in members:
            if i != keep:
                out[i] = (keep, float(np.mean(sig[i] == sig[keep])))
    return out
