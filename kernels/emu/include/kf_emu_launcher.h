// kf_emu_launcher.h: included by the launcher the build script generates for
// each .cu: a trampoline per entry point that unpacks a cuLaunchKernel-style
// argument array (void** args, one pointer per parameter) into a typed call.
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

extern "C" void kf_emu_register_dyn_smem(void* (*addr)(), size_t bytes);

struct KfEmuEntry {
    const char* name;
    void (*tramp)(void**);
    uint32_t nparams;
    const uint32_t* param_sizes;
};

template <class F, F f> struct KfEmuTramp;
template <class... A, void (*f)(A...)>
struct KfEmuTramp<void (*)(A...), f> {
    static constexpr uint32_t sizes[sizeof...(A) + 1] = {(uint32_t)sizeof(A)..., 0};
    template <size_t... I>
    // the call itself stays instrumented: a sanitize mismatch forbids inlining the kernel here
    __attribute__((no_sanitize_thread)) static void go(void** a, std::index_sequence<I...>) {
        f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(a[I])...);
    }
    __attribute__((no_sanitize_thread)) static void call(void** a) { go(a, std::index_sequence_for<A...>{}); }
};

#define KF_EMU_ENTRY(name) \
    { #name, &KfEmuTramp<decltype(&name), &name>::call, (uint32_t)(sizeof(KfEmuTramp<decltype(&name), &name>::sizes) / 4 - 1), KfEmuTramp<decltype(&name), &name>::sizes }
