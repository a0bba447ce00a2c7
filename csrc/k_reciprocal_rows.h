// k-reciprocal masks: the per-row steps of k_reciprocal.h, written once for a group of
// threads that works on one row together: one CPU thread (SerialGroup, here) or one CUDA
// block (BlockGroup, k_reciprocal_cuda.cu). A group provides
//
//   for_each(n, f)        f(i) for every i in [0, n), split among its threads;
//   sync()                a barrier (memory written before it is seen after it);
//   leader()              true for exactly one thread;
//   fetch_add(&x, v)      an atomic add to a uint32_t that every thread sees, returning the old value.
//
// All selection is by radix select on keys (8 bits per pass, most significant first), so
// the work per row is linear and does not depend on how the values are spread: crowded
// similarities cost what spread ones do. The CPU runs exactly this code, which is how
// the CUDA kernels' selection is tested without a GPU.

#pragma once

#include "k_reciprocal.h"

// Functions generic over the group call its __device__ members on CUDA and its host
// members on the CPU; nvcc checks execution spaces before it knows which.
#ifdef __CUDACC__
#define JSA_FAST_GROUP_FUNCTION _Pragma("nv_exec_check_disable")
#else
#define JSA_FAST_GROUP_FUNCTION
#endif

namespace jsa_fast {
namespace k_reciprocal {

// What a group's threads share (CUDA shared memory; a local on the CPU).
struct RowScratch {
  uint32_t histogram[256];
  uint32_t digit;
  uint32_t rank;
  uint32_t count;
  uint64_t kth;
};

// Up to this many keys, emit_largest ranks each key by counting the larger ones (n^2
// compares, spread over the group) instead of radix passes, each of which clears and
// scans a 256-bin histogram.
constexpr int64_t kRankSelectMax = 64;

// A group of one CPU thread.
struct SerialGroup {
  template <class F>
  void for_each(int64_t n, const F& f) const {
    for (int64_t i = 0; i < n; ++i) {
      f(i);
    }
  }
  void sync() const {}
  bool leader() const {
    return true;
  }
  static uint32_t fetch_add(uint32_t* counter, uint32_t value) {
    const uint32_t old = *counter;
    *counter = old + value;
    return old;
  }
};

// The k-th largest (1 <= k <= n, repeats counted) of the keys key_at(i), i in [0, n).
JSA_FAST_GROUP_FUNCTION
template <class Key, class Group, class KeyAt>
JSA_FAST_HOST_DEVICE Key kth_largest(const Group& group, RowScratch& scratch, int64_t n, int64_t k, const KeyAt& key_at) {
  Key prefix = 0;  // the digits found so far
  Key known = 0;   // their bits
  auto rank = static_cast<uint32_t>(k);  // the wanted key's rank among the keys that match prefix
  for (int shift = 8 * static_cast<int>(sizeof(Key)) - 8; shift >= 0; shift -= 8) {
    group.for_each(256, [&](int64_t digit) { scratch.histogram[digit] = 0; });
    group.sync();
    group.for_each(n, [&](int64_t i) {
      const Key key = key_at(i);
      if ((key & known) == prefix) {
        group.fetch_add(&scratch.histogram[(key >> shift) & 0xFF], 1);
      }
    });
    group.sync();
    if (group.leader()) {
      uint32_t digit = 255;
      uint32_t left = rank;
      while (scratch.histogram[digit] < left) {  // the matching keys number at least rank
        left -= scratch.histogram[digit];
        --digit;
      }
      scratch.digit = digit;
      scratch.rank = left;
    }
    group.sync();
    prefix = static_cast<Key>(prefix | (static_cast<Key>(scratch.digit) << shift));
    known = static_cast<Key>(known | (static_cast<Key>(0xFF) << shift));
    rank = scratch.rank;
    group.sync();  // everyone has read digit and rank before the next pass writes them
  }
  return prefix;
}

// emit(slot, key) for the keys key_at(i), i in [0, n), that are among the k largest and
// not kEmptyKey (keys other than kEmptyKey distinct), with slots 0, 1, ... in any order;
// returns the k-th largest key (kEmptyKey when fewer than k keys are not). Afterwards
// scratch.count holds the number emitted.
JSA_FAST_GROUP_FUNCTION
template <class Group, class KeyAt, class Emit>
JSA_FAST_HOST_DEVICE uint64_t emit_largest(
    const Group& group, RowScratch& scratch, int64_t n, int64_t k, const KeyAt& key_at, const Emit& emit) {
  if (n <= kRankSelectMax) {
    if (group.leader()) {
      scratch.count = 0;
      scratch.kth = kEmptyKey;
    }
    group.sync();
    group.for_each(n, [&](int64_t i) {
      const uint64_t key = key_at(i);
      if (key == kEmptyKey) {
        return;
      }
      int64_t rank = 0;  // among the keys other than kEmptyKey, which are distinct
      for (int64_t j = 0; j < n; ++j) {
        rank += key_at(j) > key;
      }
      if (rank < k) {
        emit(group.fetch_add(&scratch.count, 1), key);
      }
      if (rank == k - 1) {
        scratch.kth = key;
      }
    });
    group.sync();
    const uint64_t kth = scratch.kth;
    group.sync();  // everyone has read kth before it is reused
    return kth;
  }
  const auto kth = kth_largest<uint64_t>(group, scratch, n, k, key_at);
  if (group.leader()) {
    scratch.count = 0;
  }
  group.sync();
  group.for_each(n, [&](int64_t i) {
    const uint64_t key = key_at(i);
    if (key >= kth && key != kEmptyKey) {
      emit(group.fetch_add(&scratch.count, 1), key);
    }
  });
  group.sync();
  return kth;
}

// Step 2 for one row of the filter tile (B bfloat16 bits): finds the k-th largest value
// and writes the indices of the values at or above its candidate_floor to
// candidates[0, limit) in any order. Returns how many there are; above limit, only the
// first limit found are written.
JSA_FAST_GROUP_FUNCTION
template <class Group>
JSA_FAST_HOST_DEVICE uint32_t select_candidates(
    const Group& group, RowScratch& scratch, const uint16_t* filter_row, int64_t batch, int64_t k,
    const FilterBound& bound, int64_t limit, int32_t* candidates) {
  const auto kth = kth_largest<uint16_t>(
      group, scratch, batch, k, [&](int64_t j) { return bfloat16_order(filter_row[j]); });
  const float floor = candidate_floor(bfloat16_value(bfloat16_from_order(kth)), bound);
  if (group.leader()) {
    scratch.count = 0;
  }
  group.sync();
  group.for_each(batch, [&](int64_t j) {
    if (bfloat16_value(filter_row[j]) >= floor) {
      const uint32_t slot = group.fetch_add(&scratch.count, 1);
      if (slot < limit) {
        candidates[slot] = static_cast<int32_t>(j);
      }
    }
  });
  group.sync();
  const uint32_t count = scratch.count;
  group.sync();  // everyone has read count before it is reused
  return count;
}

// Steps 2-3 for one row: its candidates, then fill_keys(count) (run by every thread of
// the group) sets keys[c] = neighbour_key(s, candidates[c]) for c < count, and the k
// largest keys' indices go to neighbours_row[0, k). Returns false, writing nothing, when
// the row has more than limit candidates.
JSA_FAST_GROUP_FUNCTION
template <class Group, class FillKeys>
JSA_FAST_HOST_DEVICE bool refine_row(
    const Group& group, RowScratch& scratch, const uint16_t* filter_row, int64_t batch, int64_t k,
    const FilterBound& bound, int64_t limit, int32_t* candidates, uint64_t* keys, const FillKeys& fill_keys,
    int32_t* neighbours_row) {
  const uint32_t count = select_candidates(group, scratch, filter_row, batch, k, bound, limit, candidates);
  if (count > limit) {
    return false;
  }
  fill_keys(count);
  group.sync();
  emit_largest(
      group, scratch, count, k, [&](int64_t c) { return keys[c]; },
      [&](uint32_t slot, uint64_t key) { neighbours_row[slot] = key_index(key); });
  return true;
}

// Step 4's running top-k for one row: state[0, k) (kEmptyKey in empty slots) becomes the
// k largest of itself and new_key(i), i in [0, n); *floor is the smallest key of a full
// state, else kEmptyKey. The new keys come in chunks of kMergeChunk, and of each only
// those above the floor (survivors) are selected among: once the first chunks have
// filled the state, a chunk of rows in no particular order has few. survivors
// (kMergeChunk keys) and next (k) are the group's scratch.
JSA_FAST_GROUP_FUNCTION
template <class Group, class NewKey>
JSA_FAST_HOST_DEVICE void merge_largest(
    const Group& group, RowScratch& scratch, uint64_t* state, uint64_t* floor, int64_t k, int64_t n,
    const NewKey& new_key, uint64_t* survivors, uint64_t* next) {
  for (int64_t chunk = 0; chunk < n; chunk += kMergeChunk) {
    const int64_t length = n - chunk < kMergeChunk ? n - chunk : kMergeChunk;
    const uint64_t current_floor = *floor;
    if (group.leader()) {
      scratch.count = 0;
    }
    group.sync();
    group.for_each(length, [&](int64_t i) {
      const uint64_t key = new_key(chunk + i);
      if (key > current_floor) {
        survivors[group.fetch_add(&scratch.count, 1)] = key;
      }
    });
    group.sync();
    const uint32_t added = scratch.count;
    group.sync();  // everyone has read count before it is reused
    if (added == 0) {
      continue;
    }
    const uint64_t kth = emit_largest(
        group, scratch, k + added, k, [&](int64_t i) { return i < k ? state[i] : survivors[i - k]; },
        [&](uint32_t slot, uint64_t key) { next[slot] = key; });
    const uint32_t kept = scratch.count;  // k, or fewer real keys than k so far
    group.for_each(k, [&](int64_t slot) { state[slot] = slot < kept ? next[slot] : kEmptyKey; });
    if (group.leader()) {
      *floor = kept == k ? kth : kEmptyKey;
    }
    group.sync();  // the state and floor are written before the next chunk reads them
  }
}

}  // namespace k_reciprocal
}  // namespace jsa_fast
