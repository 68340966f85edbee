// Row-wise work split into tasks of about `grain` elements: several rows to a task when rows are
// short, and pieces of one row when they are long. Without the split a same-shape Add or copy,
// whose layout merges into a single row of millions of elements, ran as one task on one thread.
#pragma once
#include <algorithm>

#include "pool.h"
#include "variant.h"

ST_BEGIN_NAMESPACE

// f(row, i0, i1) for every row < rows, covering [0, n) of each row exactly once.
template <class F>
void parallel_rows(long rows, long n, long grain, const F& f) {
  if (rows <= 0 || n <= 0) return;
  if (n >= 2 * grain) {  // long rows: each split into pieces of `grain`
    const long pieces = (n + grain - 1) / grain;
    parallel_for(static_cast<int>(rows * pieces), [&](int t) {
      const long row = t / pieces, i0 = (t % pieces) * grain;
      f(row, i0, std::min(n, i0 + grain));
    });
    return;
  }
  const long perTask = std::max(1L, grain / n), tasks = (rows + perTask - 1) / perTask;
  parallel_for(static_cast<int>(tasks), [&](int t) {
    for (long row = t * perTask; row < std::min(rows, (t + 1) * perTask); row++) f(row, 0L, n);
  });
}

ST_END_NAMESPACE  // st::ST_ISA
