// The attention op: paged attention that reads NF4 pages directly. Each task (up to 64
// queries of one request against one KV head, or one key segment of a long decode)
// dequantizes the pages it needs, a chunk at a time, into cache-resident fp32 scratch; no
// fp32 copy of the cache exists.
//
// This file checks the batch, cuts it into tasks and runs them on the thread pool; the
// arithmetic is attention_math.h, the decoding decoders.h, the rotation rotation.h. A task's
// bits depend only on its own queries and keys (attention_math.h), never on which thread runs
// it or what else is in the batch. Queries and outputs are vLLM's tensors in the model's dtype,
// the layer's calibration applied on the way (head_rows.h).

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <vector>

#include "attention_math.h"
#include "common.h"
#include "decode_step.h"
#include "decoders.h"
#include "head_rows.h"
#include "ops.h"
#include "rotation.h"

namespace nf4kv {
namespace {

constexpr int kQueryTile = 64;     // queries of one request per attention task
constexpr int64_t kKeyChunk = 64;  // tokens dequantized at a time (16 KB of K or V at head_dim 64)
static_assert(kKeyChunk % kLanes == 0, "chunks start on key-tile boundaries");
// Keys [k S, (k + 1) S) of a request get one softmax each, folded in order (attention_math.h).
// Part of the arithmetic: changing it changes the bits of queries with more than S keys.
constexpr int64_t kKeySegment = 512;

// The batch as the tasks read it, checked once.
struct Batch {
  CacheGeometry g;
  int64_t group;  // query heads per KV head
  int64_t num_reqs;
  const uint8_t* cache;
  const int32_t* block_table;  // [num_reqs, max_blocks]
  const int32_t* starts;       // query_start_loc
  const int32_t* lens;         // seq_lens
  HeadRows query, out;
  HeadTable query_scale, output_offset;  // [num_heads, head_dim] each, or none
  float scale;
  bool causal;
  int64_t sliding_window;
};

Batch check_batch(const at::Tensor& query, const at::Tensor& cache, const at::Tensor& block_table,
                  const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale, bool causal,
                  int64_t sliding_window, const RowGeometry& key_row, const RowGeometry& value_row,
                  const at::Tensor& out, const std::optional<at::Tensor>& query_scale,
                  const std::optional<at::Tensor>& output_offset) {
  Batch b{};
  b.query = HeadRows(query, "query");
  b.out = HeadRows(out, "out");
  TORCH_CHECK(out.sizes() == query.sizes(), "out must be shaped like the query ", query.sizes(), ", got ",
              out.sizes());
  at::assert_no_overlap(out, query);  // tasks read query rows while others write outputs
  TORCH_CHECK(block_table.dtype() == at::kInt && block_table.is_contiguous() && block_table.dim() == 2,
              "block_table must be contiguous int32 [num_reqs, max_blocks], got ", block_table.dtype(), " ",
              block_table.sizes());
  TORCH_CHECK(seq_lens.dtype() == at::kInt && query_start_loc.dtype() == at::kInt && seq_lens.is_contiguous() &&
                  query_start_loc.is_contiguous() && seq_lens.dim() == 1 && query_start_loc.dim() == 1,
              "seq_lens [num_reqs] and query_start_loc [num_reqs + 1] must be contiguous int32");
  const int64_t num_reqs = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) >= num_reqs + 1 && block_table.size(0) >= num_reqs, "metadata for ",
              num_reqs, " requests needs query_start_loc of >= ", num_reqs + 1, " entries (got ",
              query_start_loc.size(0), ") and a block_table of >= ", num_reqs, " rows (got ", block_table.size(0),
              ")");
  CacheGeometry& g = b.g;
  g.num_heads = query.size(1);
  g.head_dim = query.size(2);
  TORCH_CHECK(key_row.head_dim == g.head_dim, "the query's head_dim ", g.head_dim, " is not the rows' ",
              key_row.head_dim);
  g.cell = cell_geometry(key_row, value_row);  // row_geometry checked the scale groups
  check_cache(cache, g.cell.cell_bytes);
  g.num_kv_heads = cache.size(1);
  g.block_size = cache.size(2);
  g.max_blocks = block_table.size(1);
  TORCH_CHECK(g.num_heads % g.num_kv_heads == 0, "num_heads ", g.num_heads, " is not a multiple of num_kv_heads ",
              g.num_kv_heads);
  b.group = g.num_heads / g.num_kv_heads;
  TORCH_CHECK(b.group <= CPU_MAX_QUERY_HEADS_PER_KV_HEAD, "at most ", CPU_MAX_QUERY_HEADS_PER_KV_HEAD,
              " query heads per KV head, got ", b.group);
  b.num_reqs = num_reqs;
  b.cache = cache.data_ptr<uint8_t>();
  b.block_table = block_table.data_ptr<int32_t>();
  b.starts = query_start_loc.data_ptr<int32_t>();
  b.lens = seq_lens.data_ptr<int32_t>();
  b.query_scale = HeadTable(query_scale, g.num_heads, g.head_dim, "query_scale");
  b.output_offset = HeadTable(output_offset, g.num_heads, g.head_dim, "output_offset");
  b.scale = static_cast<float>(scale);
  b.causal = causal;
  b.sliding_window = sliding_window;
  return b;
}

// Keys query j of a request may read: [first(j), end(j)), both nondecreasing in j.
struct KeyWindow {
  int64_t context, seq_len, sliding_window;
  bool causal;
  int64_t first(int64_t j) const {
    return sliding_window > 0 ? std::max<int64_t>(0, context + j - sliding_window + 1) : 0;
  }
  int64_t end(int64_t j) const { return causal ? std::min(context + j + 1, seq_len) : seq_len; }
};

KeyWindow window_of(const Batch& b, int64_t request) {
  const int64_t seq_len = b.lens[request];
  return {seq_len - (b.starts[request + 1] - b.starts[request]), seq_len, b.sliding_window, b.causal};
}

// Up to kQueryTile queries of one request against one KV head, over key segments
// [first_segment, end_segment) (attention_math.h). A decode whose keys span several segments
// becomes one task per segment, each leaving its state in a partial slot (slot >= 0) for
// merge_decode to fold: with two threads, one long sequence (or one KV head) keeps both busy.
struct Task {
  int64_t request, kv_head, first_query, end_query;
  int64_t first_segment, end_segment;
  int64_t slot;  // < 0: the task folds its segments and writes the outputs itself
};

// A split decode: its segments' partial slots are slot, slot + 1, ... in segment order.
struct SplitDecode {
  int64_t request, kv_head, query, num_segments, slot;
};

// A partial slot: per query row, the segment's max, sum and unnormalized output.
int64_t slot_floats(const Batch& b) { return b.group * (2 + b.g.head_dim); }

// One task per (request, tile of its queries, KV head), checking each request's metadata; a
// decode over more than one segment is split by segment (`splits`, and its slots).
std::vector<Task> make_tasks(const Batch& b, int64_t num_query_tokens, std::vector<SplitDecode>& splits) {
  std::vector<Task> tasks;
  int64_t slots = 0;
  for (int64_t r = 0; r < b.num_reqs; ++r) {
    const int64_t q_len = b.starts[r + 1] - b.starts[r];
    TORCH_CHECK(q_len >= 0 && q_len <= b.lens[r], "request ", r, ": ", q_len, " queries but seq_len ", b.lens[r]);
    TORCH_CHECK((b.lens[r] + b.g.block_size - 1) / b.g.block_size <= b.g.max_blocks, "request ", r,
                ": block table too short for seq_len ", b.lens[r]);
    TORCH_CHECK(b.starts[r + 1] <= num_query_tokens, "query_start_loc beyond the query tensor");
    const KeyWindow window = window_of(b, r);
    for (int64_t j = 0; j < q_len; j += kQueryTile) {
      const int64_t end_query = std::min(q_len, j + kQueryTile);
      const int64_t lo = window.first(j), hi = window.end(end_query - 1);
      const int64_t first_segment = lo / kKeySegment, end_segment = std::max(lo, hi - 1) / kKeySegment + 1;
      const bool split = end_query - j == 1 && end_segment - first_segment > 1;
      for (int64_t h = 0; h < b.g.num_kv_heads; ++h) {
        if (!split) {
          tasks.push_back({r, h, j, end_query, first_segment, end_segment, -1});
          continue;
        }
        splits.push_back({r, h, j, end_segment - first_segment, slots});
        for (int64_t k = first_segment; k < end_segment; ++k) tasks.push_back({r, h, j, end_query, k, k + 1, slots++});
      }
    }
  }
  return tasks;
}

// Longest tasks first: handed out one at a time, a static split would give one thread the
// late (long) query tiles of a causal prefill and leave the other idle.
void order_longest_first(std::vector<Task>& tasks, const Batch& b) {
  auto cost = [&](const Task& task) {
    const KeyWindow window = window_of(b, task.request);
    const int64_t lo = std::max(window.first(task.first_query), task.first_segment * kKeySegment);
    const int64_t hi = std::min(window.end(task.end_query - 1), task.end_segment * kKeySegment);
    return (task.end_query - task.first_query + 1) * std::max<int64_t>(0, hi - lo);
  };
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& x, const Task& y) { return cost(x) > cost(y); });
}

// Where a row's output goes: its token and query head.
struct RowPlace { int64_t token, head; };

// Row `row` (of this KV head's query heads) of query j of a request.
RowPlace place_of(const Batch& b, int64_t request, int64_t kv_head, int64_t j, int64_t row) {
  return {b.starts[request] + j, kv_head * b.group + row};
}

// A row's output (fp32, in the model's space) plus the calibration's offset, in out's dtype.
inline void store_output(const Batch& b, RowPlace place, float* output) {
  add_offset(output, b.g.head_dim, b.output_offset, place.head);
  b.out.write(place.token, place.head, b.g.head_dim, output);
}

// out = rotation^-1 (acc / sum): a row's output from its folded softmax (acc is overwritten).
inline void write_output(const Batch& b, const SoftmaxState& state, const Rotation& rotation, RowPlace place) {
  const int64_t d = b.g.head_dim;
  const float inv = 1.0f / state.sum;
  for (int64_t i = 0; i < d; ++i) state.acc[i] = state.acc[i] * inv;
  float output[CPU_MAX_HEAD_DIM];
  rotation.inverse(state.acc, output);
  store_output(b, place, output);
}

// A row no key reaches, or past the batch's last query (vLLM's padding): zero attention.
inline void write_zero_output(const Batch& b, RowPlace place) {
  float output[CPU_MAX_HEAD_DIM] = {};
  store_output(b, place, output);
}

// One thread's scratch, and the steps of one task: rotate its query rows in, then per key
// segment score the rows against the keys, softmax, accumulate the values and fold the
// segment into each row's state; then divide and rotate the outputs back (or leave the state
// in the task's partial slot). Keys, then values, are dequantized kKeyChunk tokens at a time
// (the chunk stays in L1); chunk starts are lo + multiples of 16, so score tiles line up
// across chunks.
//
// The steps are always_inline: run() is then one function body, as the loop was before it was
// split, and the compiler keeps the same values in registers (left to itself GCC kept the
// steps apart, and a causal prefill ran ~8% slower; scripts/bench_cpu_kernels.py --against).
class TaskRunner {
 public:
  TaskRunner(const Batch& b, const Rotation& rotation, const Tables& t, float* slots)
      : b_(b), rotation_(rotation), decoders_(t, b.g.cell), slots_(slots),
        keys_(static_cast<size_t>(kKeyChunk * b.g.head_dim)), values_(keys_.size()) {}

  void run(const Task& task) {
    task_ = task;
    window_ = window_of(b_, task.request);
    blocks_ = b_.block_table + task.request * b_.g.max_blocks;
    load_queries();
    const int64_t lo = window_.first(task.first_query), hi = window_.end(task.end_query - 1);
    for (int64_t k = task.first_segment; k < task.end_segment; ++k) {
      segment_begin_ = k * kKeySegment;
      segment_end_ = segment_begin_ + kKeySegment;
      lo_ = std::max(lo, segment_begin_);
      hi_ = std::min(hi, segment_end_);
      if (lo_ >= hi_) continue;
      score_keys();
      for (int64_t row = 0; row < num_rows_; ++row) {
        const int64_t j = task_.first_query + row / b_.group;
        const int64_t a = first_key(j), e = end_key(j);
        has_keys_[row] = a < e;
        if (a < e) segments_[row] = softmax_numerators(score_rows_[row], a - lo_, e - lo_);
      }
      std::fill(acc_.begin(), acc_.end(), 0.0f);
      accumulate_values_of_chunks();
      fold_segment();
    }
    if (task.slot >= 0)
      leave_partial();
    else
      write_outputs();
  }

 private:
  // One row per (query of the task, query head of this KV head), rotated into the cache's space.
  [[gnu::always_inline]] void load_queries() {
    const int64_t d = b_.g.head_dim;
    num_rows_ = (task_.end_query - task_.first_query) * b_.group;
    scores_.resize(static_cast<size_t>(num_rows_ * kKeySegment));
    query_rows_.resize(static_cast<size_t>(num_rows_ * d));
    acc_.resize(static_cast<size_t>(num_rows_ * d));
    state_acc_.resize(static_cast<size_t>(num_rows_ * d));
    states_.resize(num_rows_);
    segments_.resize(num_rows_);
    has_keys_.resize(num_rows_);
    started_.assign(num_rows_, false);
    q_rows_.resize(num_rows_);
    score_rows_.resize(num_rows_);
    acc_rows_.resize(num_rows_);
    for (int64_t row = 0; row < num_rows_; ++row) {
      const RowPlace place = place_of_row(row);
      float query[CPU_MAX_HEAD_DIM];
      b_.query.read(place.token, place.head, d, query);
      shift_and_scale(query, d, HeadTable(), b_.query_scale, place.head);
      rotation_.forward(query, query_rows_.data() + row * d);
      q_rows_[row] = query_rows_.data() + row * d;
      score_rows_[row] = scores_.data() + row * kKeySegment;
      acc_rows_[row] = acc_.data() + row * d;
      states_[row].acc = state_acc_.data() + row * d;
    }
  }

  [[gnu::always_inline]] void score_keys() {
    const int rows_per_query = static_cast<int>(b_.group);
#if defined(NF4KV_AVX512)
    if (task_.end_query - task_.first_query == 1) {
      score_decode_keys(b_.cache, blocks_, task_.kv_head, lo_, hi_, b_.g, decoders_.key, q_rows_.data(),
                        rows_per_query, b_.scale, score_rows_.data());
      return;
    }
#endif
    for (int64_t c0 = lo_; c0 < hi_; c0 += kKeyChunk) {
      const int64_t c1 = std::min(hi_, c0 + kKeyChunk);
      gather_keys(b_.cache, blocks_, task_.kv_head, c0, c1, b_.g, decoders_.key, keys_.data());
      for_each_query(c0, c1, [&](int64_t row, int64_t a, int64_t b) {
        float* shifted[CPU_MAX_QUERY_HEADS_PER_KV_HEAD];
        for (int r = 0; r < rows_per_query; ++r) shifted[r] = score_rows_[row + r] + (c0 - lo_);
        scores_rows(q_rows_.data() + row, rows_per_query, keys_.data(), a, b, b_.g.head_dim, b_.scale, shifted);
      });
    }
  }

  [[gnu::always_inline]] void accumulate_values_of_chunks() {
    const int rows_per_query = static_cast<int>(b_.group);
#if defined(NF4KV_AVX512)
    if (task_.end_query - task_.first_query == 1 && decodes_value_blocks(b_.g.cell.value)) {
      accumulate_decode_values(b_.cache, blocks_, task_.kv_head, lo_, hi_, b_.g, decoders_.value, block_order_,
                               score_rows_.data(), rows_per_query, acc_rows_.data());
      return;
    }
#endif
    for (int64_t c0 = lo_; c0 < hi_; c0 += kKeyChunk) {
      const int64_t c1 = std::min(hi_, c0 + kKeyChunk);
      gather_values(b_.cache, blocks_, task_.kv_head, c0, c1, b_.g, decoders_.value, values_.data());
      for_each_query(c0, c1, [&](int64_t row, int64_t a, int64_t b) {
        const float* shifted[CPU_MAX_QUERY_HEADS_PER_KV_HEAD];
        for (int r = 0; r < rows_per_query; ++r) shifted[r] = score_rows_[row + r] + (c0 - lo_);
        accumulate_values(shifted, rows_per_query, values_.data(), a, b, b_.g.head_dim, acc_rows_.data() + row);
      });
    }
  }

  [[gnu::always_inline]] void fold_segment() {
    const int64_t d = b_.g.head_dim;
    for (int64_t row = 0; row < num_rows_; ++row) {
      if (!has_keys_[row]) continue;
      if (started_[row])
        states_[row].fold(segments_[row], acc_rows_[row], d);
      else
        states_[row].take(segments_[row], acc_rows_[row], d);
      started_[row] = true;
    }
  }

  [[gnu::always_inline]] void write_outputs() {
    for (int64_t row = 0; row < num_rows_; ++row) {
      if (!started_[row])  // no key to read: cannot happen for decoders (a query sees itself)
        write_zero_output(b_, place_of_row(row));
      else
        write_output(b_, states_[row], rotation_, place_of_row(row));
    }
  }

  // A split decode's segment: [max, sum, acc...] per row (its only query sees keys here).
  void leave_partial() const {
    const int64_t d = b_.g.head_dim;
    float* slot = slots_ + task_.slot * slot_floats(b_);
    for (int64_t row = 0; row < num_rows_; ++row, slot += 2 + d) {
      slot[0] = states_[row].max;
      slot[1] = states_[row].sum;
      std::copy(states_[row].acc, states_[row].acc + d, slot + 2);
    }
  }

  // Query j's keys within the current segment: [first_key(j), end_key(j)).
  int64_t first_key(int64_t j) const { return std::max(window_.first(j), segment_begin_); }
  int64_t end_key(int64_t j) const { return std::min(window_.end(j), segment_end_); }

  // visit(first row of query j, the query's keys within chunk [c0, c1) as [a, b) from c0)
  template <class Visit>
  void for_each_query(int64_t c0, int64_t c1, Visit&& visit) const {
    for (int64_t j = task_.first_query; j < task_.end_query; ++j) {
      const int64_t a = std::max(first_key(j), c0), b = std::min(end_key(j), c1);
      if (a < b) visit((j - task_.first_query) * b_.group, a - c0, b - c0);
    }
  }

  RowPlace place_of_row(int64_t row) const {
    return place_of(b_, task_.request, task_.kv_head, task_.first_query + row / b_.group, row % b_.group);
  }

  const Batch& b_;
  const Rotation& rotation_;
  const KVDecoders decoders_;
#if defined(NF4KV_AVX512)
  const BlockOrder block_order_;
#endif
  float* slots_;
  std::vector<float> keys_, values_, scores_, query_rows_, acc_, state_acc_;
  std::vector<SoftmaxState> states_;
  std::vector<SegmentSoftmax> segments_;
  std::vector<char> has_keys_, started_;
  std::vector<const float*> q_rows_;
  std::vector<float*> score_rows_, acc_rows_;
  Task task_{};
  KeyWindow window_{};
  const int32_t* blocks_ = nullptr;
  int64_t lo_ = 0, hi_ = 0, num_rows_ = 0, segment_begin_ = 0, segment_end_ = 0;
};

// A split decode's segments folded in order, the same take / fold as inside a task.
void merge_decode(const Batch& b, const Rotation& rotation, const SplitDecode& split, const float* slots,
                  std::vector<float>& acc) {
  const int64_t d = b.g.head_dim;
  acc.resize(static_cast<size_t>(d));
  for (int64_t row = 0; row < b.group; ++row) {
    SoftmaxState state{0.0f, 0.0f, acc.data()};
    for (int64_t k = 0; k < split.num_segments; ++k) {
      const float* slot = slots + (split.slot + k) * slot_floats(b) + row * (2 + d);
      const SegmentSoftmax segment{slot[0], slot[1]};
      if (k == 0)
        state.take(segment, slot + 2, d);
      else
        state.fold(segment, slot + 2, d);
    }
    write_output(b, state, rotation, place_of(b, split.request, split.kv_head, split.query, row));
  }
}

}  // namespace

namespace NF4KV_OPS {

void attention(const at::Tensor& query, const at::Tensor& cache, const at::Tensor& block_table,
               const at::Tensor& signs, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
               const at::Tensor& levels, const at::Tensor& scale_values, double scale, bool causal,
               int64_t sliding_window, int64_t key_group, int64_t key_relative_bits, const at::Tensor& key_ladder,
               int64_t value_group, int64_t value_relative_bits, const at::Tensor& value_ladder,
               const at::Tensor& out, const std::optional<at::Tensor>& query_scale,
               const std::optional<at::Tensor>& output_offset) {
  TORCH_CHECK(query.dim() == 3, "query must be [num_tokens, num_heads, head_dim], got ", query.sizes());
  const int64_t head_dim = query.size(2);
  const RowGeometry key_row = row_geometry(head_dim, key_group, key_relative_bits, key_ladder);
  const RowGeometry value_row = row_geometry(head_dim, value_group, value_relative_bits, value_ladder);
  const Batch batch = check_batch(query, cache, block_table, seq_lens, query_start_loc, scale, causal,
                                  sliding_window, key_row, value_row, out, query_scale, output_offset);
  const Rotation rotation(signs_of(signs, batch.g.head_dim), batch.g.head_dim);
  const Tables t = tables_of(levels, nullptr, scale_values);
  std::vector<SplitDecode> splits;
  std::vector<Task> tasks = make_tasks(batch, query.size(0), splits);
  order_longest_first(tasks, batch);
  int64_t num_slots = 0;
  for (const SplitDecode& split : splits) num_slots += split.num_segments;
  std::vector<float> slots(static_cast<size_t>(num_slots * slot_floats(batch)));
  // Tasks handed out one at a time; which thread runs a task does not change its bits.
  std::atomic<int64_t> next_task{0};
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_tasks), 1, [&](int64_t, int64_t) {
    TaskRunner runner(batch, rotation, t, slots.data());
    for (int64_t i; (i = next_task.fetch_add(1)) < num_tasks;) runner.run(tasks[i]);
  });
  const int64_t num_splits = static_cast<int64_t>(splits.size());
  at::parallel_for(0, num_splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc;
    for (int64_t i = begin; i < end; ++i) merge_decode(batch, rotation, splits[i], slots.data(), acc);
  });
  for (int64_t token = batch.starts[batch.num_reqs]; token < query.size(0); ++token)
    for (int64_t head = 0; head < batch.g.num_heads; ++head) write_zero_output(batch, {token, head});
}

}  // namespace NF4KV_OPS
}  // namespace nf4kv
