// The pair of ops an autograd kernel of csrc/*_autograd.cpp calls: a flavour's forward op and its backward
// op, looked up by name once per flavour, and how the backward op is called. A flavour is a struct naming both (kForward, kBackward); the Triton
// flavours' ops are defined from Python, after this extension registers its kernels for them, which the
// dispatcher allows: the lookup happens on the first call, when every schema exists.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>

namespace resfuse {

template <class ForwardSignature, class BackwardSignature>
struct FlavourOps {
  c10::TypedOperatorHandle<ForwardSignature> forward;
  c10::TypedOperatorHandle<BackwardSignature> backward;
};

template <class Flavour, class ForwardSignature, class BackwardSignature>
const FlavourOps<ForwardSignature, BackwardSignature>& flavour_ops() {
  static const FlavourOps<ForwardSignature, BackwardSignature> ops{
      c10::Dispatcher::singleton().findSchemaOrThrow(Flavour::kForward, "").template typed<ForwardSignature>(),
      c10::Dispatcher::singleton().findSchemaOrThrow(Flavour::kBackward, "").template typed<BackwardSignature>()};
  return ops;
}

// Runs `call` (a backward op's call) below autograd in an ordinary backward; through the backward op's own
// Autograd kernel when grad mode is on, i.e. when create_graph=True asks autograd to record the backward.
template <class Call>
auto call_below_autograd_unless_recording(const Call& call) {
  if (at::GradMode::is_enabled()) {
    return call();
  }
  at::AutoDispatchBelowAutograd below_autograd;
  return call();
}

}  // namespace resfuse
