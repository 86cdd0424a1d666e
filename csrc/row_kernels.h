// Row kernels over a tile's (rows, n) float rows: softmax, the L1 distance to a reference, the
// softmax backward and a transpose. Included once per instruction set by attention_ops.cpp (no include
// guard), inside a namespace that first defines the vector primitives:
//   V, W (lanes), Tail (a mask for the last n % W lanes), tail_of(t), set1, load, store,
//   load_tail(p, tail, fill) (fill in the masked-off lanes), store_tail, where_tail(tail, a, fill) (a in
//   the tail's live lanes, fill in the others), add, sub, mul, fmadd (a b + c),
//   max, absolute, step (w where a > 0, -w where a < 0, else 0), round_even, pow2 (2^n for integral
//   n in [-126, 127]), select_ge (a where x >= cut, else 0), hsum and hmax; and TB with
//   transpose_block(src, lds, dst, ld): dst's TB rows (stride ld) = the transpose of src's TB x TB block.
// The exp is Cephes' expf for x <= 0 (2^n exp(f), |f| <= ln2 / 2, degree 6, within 2 ulp), 0 below
// -87.3 where expf is subnormal; libm's expf differs from it in the last bit or two.

inline V exp_nonpositive(V x) {
  const V n = round_even(mul(x, set1(1.44269504088896341f)));
  V f = fmadd(n, set1(-0.693359375f), x);  // x - n ln2 in two parts (Cody-Waite)
  f = fmadd(n, set1(2.12194440e-4f), f);
  V p = set1(1.9875691500e-4f);
  p = fmadd(p, f, set1(1.3981999507e-3f));
  p = fmadd(p, f, set1(8.3334519073e-3f));
  p = fmadd(p, f, set1(4.1665795894e-2f));
  p = fmadd(p, f, set1(1.6666665459e-1f));
  p = fmadd(p, f, set1(5.0000001201e-1f));
  p = fmadd(mul(p, f), f, add(f, set1(1.0f)));
  return select_ge(x, -87.3f, mul(p, pow2(max(n, set1(-126.0f)))));
}

// exp(scale * x - shift) for a row's body; the tail takes where_tail's -inf for its masked-off lanes.
inline V shifted_exp(V x, V scale, V shift) { return exp_nonpositive(sub(mul(x, scale), shift)); }
inline V tail_scores(const float* x, Tail tail, V scale) {
  return where_tail(tail, mul(load_tail(x, tail, 0.0f), scale), -INFINITY);
}

// Row-wise softmax of scale * scores (row stride lds >= n; the scale multiplies first, so any sign works)
// into n-wide rows. The tail vector stays in a register between passes: a masked store read back by a
// masked load misses store forwarding. With `stats`, each row's (shift, 1 / sum) pair is written to
// stats[2 r], stats[2 r + 1] for exp_rows.
void softmax_rows(const float* scores, int64_t lds, float* probs, int64_t rows, int64_t n, float scale,
                  float* stats) {
  const int64_t body = n - n % W;
  const Tail tail = tail_of(n % W);
  const V w = set1(scale);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = scores + r * lds;
    float* y = probs + r * n;
    const V x_tail = tail_scores(x + body, tail, w);
    V top = x_tail;
    for (int64_t c = 0; c < body; c += W) top = max(top, mul(load(x + c), w));
    const float top_1 = hmax(top);
    const V shift = set1(top_1);
    const V e_tail = exp_nonpositive(sub(x_tail, shift));  // 0 in masked-off lanes
    V sum = e_tail;
    for (int64_t c = 0; c < body; c += W) {
      const V e = shifted_exp(load(x + c), w, shift);
      store(y + c, e);
      sum = add(sum, e);
    }
    const float inv_1 = 1.0f / hsum(sum);
    const V inv = set1(inv_1);
    for (int64_t c = 0; c < body; c += W) store(y + c, mul(load(y + c), inv));
    store_tail(y + body, tail, mul(e_tail, inv));
    if (stats) {
      stats[2 * r] = top_1;
      stats[2 * r + 1] = inv_1;
    }
  }
}

// The probabilities softmax_rows wrote, rebuilt from the same scores and its row statistics in one pass:
// the same operations on the same values, so bitwise the same P (the backward's recompute without the
// max and sum passes).
void exp_rows(const float* scores, int64_t lds, float* probs, int64_t rows, int64_t n, float scale,
              const float* stats) {
  const int64_t body = n - n % W;
  const Tail tail = tail_of(n % W);
  const V w = set1(scale);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = scores + r * lds;
    float* y = probs + r * n;
    const V shift = set1(stats[2 * r]), inv = set1(stats[2 * r + 1]);
    for (int64_t c = 0; c < body; c += W) store(y + c, mul(shifted_exp(load(x + c), w, shift), inv));
    store_tail(y + body, tail, mul(exp_nonpositive(sub(tail_scores(x + body, tail, w), shift)), inv));
  }
}

// sum over rows of sum_c |a - b|: each row sums in vector lanes, rows add up in double (one long float
// sum would drift).
double l1_rows(const float* a, const float* b, int64_t rows, int64_t n) {
  const int64_t body = n - n % W;
  const Tail tail = tail_of(n % W);
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = a + r * n;
    const float* y = b + r * n;
    V acc = absolute(sub(load_tail(x + body, tail, 0.0f), load_tail(y + body, tail, 0.0f)));
    for (int64_t c = 0; c < body; c += W) acc = add(acc, absolute(sub(load(x + c), load(y + c))));
    total += hsum(acc);
  }
  return total;
}

// Softmax backward in place on dP's rows (stride ldd; P's and ref's are n-wide): dP += w sign(P - ref) first
// when ref is given (the L1 loss's gradient, fused guided case), then Delta = rowsum(P dP) and
// dS = P (dP - Delta), written times `scale` (the softmax scale: dQ and dK both take scale dS).
void softmax_grad_rows(const float* probs, float* d_probs, int64_t ldd, const float* ref, float w, float scale,
                       int64_t rows, int64_t n) {
  const int64_t body = n - n % W;
  const Tail tail = tail_of(n % W);
  const V weight = set1(w), out_scale = set1(scale);
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = probs + r * n;
    float* d = d_probs + r * ldd;
    const float* e = ref ? ref + r * n : nullptr;
    const V p_tail = load_tail(p + body, tail, 0.0f);
    V d_tail = load_tail(d + body, tail, 0.0f);
    if (e) d_tail = add(d_tail, step(sub(p_tail, load_tail(e + body, tail, 0.0f)), weight));
    V delta = mul(p_tail, d_tail);
    for (int64_t c = 0; c < body; c += W) {
      const V pc = load(p + c);
      V dc = load(d + c);
      if (e) {
        dc = add(dc, step(sub(pc, load(e + c)), weight));
        store(d + c, dc);
      }
      delta = fmadd(pc, dc, delta);
    }
    const V shift = set1(hsum(delta));
    for (int64_t c = 0; c < body; c += W) store(d + c, mul(mul(load(p + c), sub(load(d + c), shift)), out_scale));
    store_tail(d + body, tail, mul(mul(p_tail, sub(d_tail, shift)), out_scale));
  }
}

// dst (n, ld) = the transpose of (rows, n) float rows src of row stride lds; dst's columns past rows are
// left as they are. TB x TB blocks go through registers (transpose_block), the edges element by element:
// on one AMD EPYC (Zen 4) core a plain loop's strided stores took 41-71 us for SD1.5's (77, 160) keys of
// 8 heads, 8 x 8 blocks 16 us, and the float32 capture op ran 2-4 % faster (gathering W rows at a time had
// been no faster than the plain loop). Only bits move (unaligned vector loads and stores, memcpy at the
// edges), so pairs of bfloat16 go through it as 32-bit words too (pack_b).
void transpose_rows(const float* src, int64_t lds, int64_t rows, int64_t n, float* dst, int64_t ld) {
  const int64_t row_body = rows - rows % TB, col_body = n - n % TB;
  const auto copy = [&](int64_t i, int64_t c) { std::memcpy(dst + c * ld + i, src + i * lds + c, sizeof(float)); };
  for (int64_t r = 0; r < row_body; r += TB) {
    for (int64_t c = 0; c < col_body; c += TB) transpose_block(src + r * lds + c, lds, dst + c * ld + r, ld);
    for (int64_t c = col_body; c < n; ++c) {
      for (int64_t i = r; i < r + TB; ++i) copy(i, c);
    }
  }
  for (int64_t i = row_body; i < rows; ++i) {
    for (int64_t c = 0; c < n; ++c) copy(i, c);
  }
}
