#include "pipeline/unet_call.h"

#include <algorithm>
#include <memory>
#include <utility>

#include "pipeline/device.h"

namespace tomeserve::pipeline {

UNetCall PadRows(const UNetCall& call, int64_t rows) {
  const int64_t have = call.rows();
  TORCH_CHECK(rows >= have && !call.groups.empty(), "PadRows: cannot pad ", have, " rows to ", rows);
  if (rows == have) return call;
  const int64_t extra = rows - have;
  UNetCall out = call;
  const auto pad = [extra](const at::Tensor& t) {
    std::vector<int64_t> shape = t.sizes().vec();
    shape[0] = extra;
    return at::cat({t, at::zeros(shape, t.options())});
  };
  out.sample = pad(call.sample);
  out.timesteps = pad(call.timesteps);
  out.encoder_hidden_states = pad(call.encoder_hidden_states);
  if (call.added.text_embeds.defined()) {
    out.added = {.text_embeds = pad(call.added.text_embeds), .time_ids = pad(call.added.time_ids)};
  }
  PadGroupRows(&out.groups, have, rows);
  return out;
}

void PadGroupRows(std::vector<UNetCall::Group>* groups, int64_t have, int64_t rows) {
  TORCH_CHECK(!groups->empty(), "PadGroupRows: no groups");
  // Sample ids below every real one (DenoiseBatch's ids are >= 0), one per padding row.
  int min_sample = 0;
  for (const UNetCall::Group& g : *groups) {
    for (int s : g.info.row_sample) min_sample = std::min(min_sample, s);
  }
  UNetCall::Group& last = groups->back();
  if (rows > have) last.device_rows = at::Tensor();
  for (int64_t r = have; r < rows; ++r) {
    last.rows.push_back(r);
    last.info.row_seeds.push_back(0);
    last.info.row_is_uncond.push_back(false);
    last.info.row_sample.push_back(min_sample - 1 - static_cast<int>(r - have));
    last.info.row_call_index.push_back(0);
    last.info.row_hook_seeds.push_back(0);
  }
}

at::Tensor RunUNetCall(const UNet2DConditionModelImpl& unet, const UNetCall& call,
                       const std::vector<HookInputs*>& inputs) {
  TORCH_CHECK(inputs.empty() || inputs.size() == call.groups.size(), "RunUNetCall: ", inputs.size(),
              " hook inputs for ", call.groups.size(), " groups");
  const c10::Device device = call.sample.device();
  std::vector<std::unique_ptr<TransformerBlockHook>> hooks;
  std::vector<HookGroup> groups;
  for (size_t g = 0; g < call.groups.size(); ++g) {
    const UNetCall::Group& group = call.groups[g];
    HookGroup hook_group;
    if (call.groups.size() > 1) {
      hook_group.rows = group.device_rows.defined()
                            ? group.device_rows
                            : ToDeviceAsync(at::tensor(group.rows, at::TensorOptions().dtype(at::kLong)), device);
    }
    if (group.factory != nullptr) {
      UNetCallInfo info = group.info;
      info.inputs = inputs.empty() ? nullptr : inputs[g];
      hooks.push_back(group.factory->ForCall(info));
      hook_group.hook = hooks.back().get();
    }
    groups.push_back(std::move(hook_group));
  }
  return unet.forward(call.sample, call.timesteps, call.encoder_hidden_states, groups,
                      call.added.text_embeds.defined() ? &call.added : nullptr);
}

}  // namespace tomeserve::pipeline
