// The pair of ops an autograd kernel of csrc/*_autograd.cpp calls: a flavour's forward op and its backward
// op, looked up by name once per flavour. A flavour is a struct naming both (kForward, kBackward); the Triton
// flavours' ops are defined from Python, after this extension registers its kernels for them, which the
// dispatcher allows: the lookup happens on the first call, when every schema exists.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

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

}  // namespace resfuse
