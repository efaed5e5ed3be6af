// One UNet call of a running batch as DenoiseBatch lays it out (rows, their timesteps and text embeddings, and
// the rows grouped by hook factory), and the eager way to run it. UNetGraphs runs the same description through
// a CUDA graph. Plain values, used on the thread that runs the batch.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

#include "pipeline/generation.h"
#include "pipeline/unet.h"

namespace tomeserve::pipeline {

struct UNetCall {
  at::Tensor sample;                 // [B, in_channels, h, w] on the model's device, model dtype
  at::Tensor timesteps;              // [B] float32, on the CPU or the device
  at::Tensor encoder_hidden_states;  // [B, L, D] on the model's device
  UNetAddedConditions added;         // SDXL's text_embeds and time_ids, one row per row; undefined on SD 1.x
  struct Group {
    const HookFactory* factory = nullptr;  // not owned; null: the plain transformer block
    std::vector<int64_t> rows;             // ascending; the groups together partition [0, B)
    UNetCallInfo info;                     // the group's rows, for factory->ForCall
    at::Tensor device_rows;                // `rows` on the device; made by RunUNetCall when undefined
  };
  std::vector<Group> groups;

  int64_t rows() const { return sample.size(0); }
};

// The call grown to `rows` rows (>= call.rows()) with zero inputs, timestep 0 and zero embeddings (and zero
// added conditions). The new rows
// join the last group as samples of their own without guidance (Token Merging gives such rows its fixed
// top-left partition). Rows are independent in every UNet layer, so the first call.rows() outputs are those
// of the call itself.
UNetCall PadRows(const UNetCall& call, int64_t rows);
// PadRows' change to the groups alone: rows `have` .. `rows` - 1 appended to the last group.
void PadGroupRows(std::vector<UNetCall::Group>* groups, int64_t have, int64_t rows);

// Runs the call eagerly: [B, out_channels, h, w]. `inputs`, when not empty, has one entry per group (may be
// null) given to that group's hook as UNetCallInfo::inputs. Throws c10::Error (run it under GuardTorch).
at::Tensor RunUNetCall(const UNet2DConditionModelImpl& unet, const UNetCall& call,
                       const std::vector<HookInputs*>& inputs = {});

}  // namespace tomeserve::pipeline
