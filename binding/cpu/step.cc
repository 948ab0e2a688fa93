/*
CPU twin of cuda/step.cu: the training step's ledger (cuda/step.h states the math) and the
multi-tensor zeroing. The micro-batch sums run in row order in fp64, as the host summed the rows
read back before the ledger existed (so a CPU run's losses are the same bits as then); the CUDA
kernel sums in a fixed tree (the same values up to fp64 rounding).
*/
#include <string.h>

#include "xft_cpu.h"
#include "../../cuda/step.h"

int xft_cpu_loss_stats(const float* losses, const int* predictions, const int* targets, int rows, double aux_div, double* ledger) {
  double sum = 0.0, tokens = 0.0, correct = 0.0;
  for (int r = 0; r < rows; r++)
    if (targets[r] >= 0) {
      sum += (double)losses[r];
      tokens += 1.0;
      if (predictions[r] == targets[r]) correct += 1.0;
    }
  xft_ledger_micro(ledger, sum, tokens, correct, aux_div);
  return 0;
}

int xft_cpu_stat_add(const float* x, double* dst) {
  dst[0] += (double)x[0];
  return 0;
}

int xft_cpu_ledger_flag(const double* ledger, float* out) {
  out[0] = xft_ledger_nonfinite(ledger);
  return 0;
}

int xft_cpu_step_end(const float* sumsq, double* ledger, float* control, const float* nonfinite, int slot, int slots, double clip,
                     double budget) {
  xft_ledger_step_end(ledger, control, sumsq[0], nonfinite, slot, slots, clip, budget);
  return 0;
}

int xft_cpu_zero_many(void* const* ptrs, const size_t* bytes, int count) {
  for (int k = 0; k < count; k++)
    if (bytes[k]) memset(ptrs[k], 0, bytes[k]);
  return 0;
}
