/*
The device-side bookkeeping of a training step (cuda/step.cu, CPU twin binding/cpu/step.cc, used by
lib/train_step.ts), so that a step makes no host synchronisation: the losses, token and accuracy
counts and balance losses accumulate in a device ledger (f64), the step's end computes the gradient
norm, the clipping factor and the non-finite check on the device, and the optimizer kernels read the
factor and the skip flag from device memory (xft_step_control). The host reads the ledger once per
log interval. What the host did before, in the same order and precision (so the CPU backend's numbers
are unchanged):
  per micro-batch   sum, tokens, correct over rows with target >= 0;  loss_mb = tokens ? sum / tokens : 0
                    acc.loss += loss_mb * tokens;   acc.aux += (sum over layers of balance loss) / accum
  step end          loss = acc.tokens ? acc.loss / acc.tokens : 0,   norm = sqrt((double) sumsq)
                    finite = loss, aux and norm finite, and no rank's flag set (data parallel: nonfinite,
                    the sum over ranks of each rank's xft_ledger_nonfinite, NULL in a single process)
                    finite: scale = clip > 0 && norm > clip ? clip / norm : 1, the update runs
                    not finite: no update; skipped += 1 while skipped < budget, else the run is stopped:
                    this and every later step are not applied (the host throws XFT_NONFINITE at its read)
Ledger layout (doubles): the accumulators, the run's counters, then a ring of log records. A record
keeps the loss sum, not the mean: a data-parallel run sums the records of its ranks when it reads them.
*/
#pragma once
#include "xft_math.h"

enum {
  XFT_LEDGER_LOSS = 0,       // sum over micro-batches of loss_mb * tokens_mb
  XFT_LEDGER_TOKENS = 1,     // counted (target >= 0) tokens of the step
  XFT_LEDGER_CORRECT = 2,    // of which argmax == target
  XFT_LEDGER_AUX = 3,        // balance loss of the step (sum over micro-batches of their sum / accum)
  XFT_LEDGER_AUX_MICRO = 4,  // this micro-batch's balance losses, summed layer by layer
  XFT_LEDGER_SKIPPED = 5,    // non-finite steps skipped so far
  XFT_LEDGER_STOPPED = 6,    // 1 once a non-finite step found the budget spent
  XFT_LEDGER_NEXT = 7,       // the next record's slot when the step's end is given none (slot < 0): a graph's replay
  XFT_LEDGER_HEAD = 8,       // first log record
  XFT_LEDGER_FIELDS = 6,     // per record: loss sum, aux, grad norm, tokens, correct, status
};
// status of a log record
enum { XFT_STEP_APPLIED = 0, XFT_STEP_SKIPPED = 1, XFT_STEP_STOPPED = 2, XFT_STEP_AFTER_STOP = 3 };
// the control block the optimizer kernels read (f32 [2]): the gradient scale, and 1 to skip the update
enum { XFT_CONTROL_SCALE = 0, XFT_CONTROL_SKIP = 1 };

// a micro-batch's cross-entropy sums (sum of losses, tokens, correct) into the ledger
XFT_HD void xft_ledger_micro(double* ledger, double sum, double tokens, double correct, double aux_div) {
  const double loss = tokens > 0 ? sum / tokens : 0.0;
  ledger[XFT_LEDGER_LOSS] += loss * tokens;
  ledger[XFT_LEDGER_TOKENS] += tokens;
  ledger[XFT_LEDGER_CORRECT] += correct;
  ledger[XFT_LEDGER_AUX] += ledger[XFT_LEDGER_AUX_MICRO] / aux_div;
  ledger[XFT_LEDGER_AUX_MICRO] = 0.0;
}

// 1 when this rank's step so far has a non-finite loss or balance loss, else 0 (summed over ranks before the step's end)
XFT_HD float xft_ledger_nonfinite(const double* ledger) {
  const double tokens = ledger[XFT_LEDGER_TOKENS];
  const double loss = tokens > 0 ? ledger[XFT_LEDGER_LOSS] / tokens : 0.0;
  return isfinite(loss) && isfinite(ledger[XFT_LEDGER_AUX]) ? 0.f : 1.f;
}

// the step's end: the record in slot `slot` (< 0: the slot ledger[XFT_LEDGER_NEXT], counted up, modulo slots), the
// control block, the accumulators cleared; nonfinite:
// NULL, or the ranks' flags summed (data parallel: every rank then decides alike)
XFT_HD void xft_ledger_step_end(double* ledger, float* control, float sumsq, const float* nonfinite, int slot, int slots,
                                double clip, double budget) {
  if (slot < 0) {
    const double next = ledger[XFT_LEDGER_NEXT];
    slot = next >= 0 && next < slots ? (int)next : 0;
    ledger[XFT_LEDGER_NEXT] = (double)((slot + 1) % slots);
  }
  const double tokens = ledger[XFT_LEDGER_TOKENS];
  const double loss = tokens > 0 ? ledger[XFT_LEDGER_LOSS] / tokens : 0.0, aux = ledger[XFT_LEDGER_AUX];
  const double norm = sqrt((double)sumsq);
  const bool finite = isfinite(loss) && isfinite(aux) && isfinite(norm) && (nonfinite == nullptr || nonfinite[0] == 0.f);
  double status = XFT_STEP_APPLIED, scale = 1.0;
  if (ledger[XFT_LEDGER_STOPPED] != 0.0) status = XFT_STEP_AFTER_STOP;
  else if (!finite) {
    if (ledger[XFT_LEDGER_SKIPPED] >= budget) {
      ledger[XFT_LEDGER_STOPPED] = 1.0;
      status = XFT_STEP_STOPPED;
    } else {
      ledger[XFT_LEDGER_SKIPPED] += 1.0;
      status = XFT_STEP_SKIPPED;
    }
  } else if (clip > 0 && norm > clip) scale = clip / norm;
  double* r = ledger + XFT_LEDGER_HEAD + (size_t)slot * XFT_LEDGER_FIELDS;
  r[0] = ledger[XFT_LEDGER_LOSS], r[1] = aux, r[2] = norm, r[3] = tokens, r[4] = ledger[XFT_LEDGER_CORRECT], r[5] = status;
  control[XFT_CONTROL_SCALE] = (float)scale;
  control[XFT_CONTROL_SKIP] = status == XFT_STEP_APPLIED ? 0.f : 1.f;
  for (int i = XFT_LEDGER_LOSS; i <= XFT_LEDGER_AUX_MICRO; i++) ledger[i] = 0.0;
}

// the optimizers' view of the control block (NULL: no control, scale 1)
XFT_HD bool xft_control_skip(const float* control) { return control != nullptr && control[XFT_CONTROL_SKIP] != 0.f; }
XFT_HD float xft_control_scale(const float* control, float grad_scale) {
  return control != nullptr ? grad_scale * control[XFT_CONTROL_SCALE] : grad_scale;
}
