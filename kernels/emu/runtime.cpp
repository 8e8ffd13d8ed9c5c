// runtime.cpp: the CPU emulator of CUDA launches. The blocks of a grid run one
// after another on the calling OS thread; the threads of a block run as
// cooperatively scheduled fibers, so __syncthreads is a barrier over fibers and
// warp collectives are barriers over the 32 lanes of a warp. A fiber starts on its
// own stack through makecontext/setcontext; every later switch (fiber to
// scheduler and back) is _setjmp/_longjmp, which saves no signal mask: no system
// call per switch, as swapcontext makes (a switch is then a few nanoseconds, and
// warp collectives switch 32 fibers each).
// The kernels' translation units are compiled with -fsanitize=thread but linked
// without the TSan runtime: the __tsan_read/write callbacks defined here see
// every load and store of kernel code and check it against the device buffers
// (out of bounds = into a canary zone) and, for shared memory, against a shadow
// of the last writer/reader per byte and barrier interval (races).
// Tensor-core instructions (mma.sync, ldmatrix) are warp collectives whose lanes hand over
// pointers to their fragments; cp.async copies land at their thread's wait_group.
// Letters: T threads per block, W warps per block (ceil(T/32)).

// the fortified longjmp refuses jumps between stacks, which is what fibers do
#undef _FORTIFY_SOURCE
#include <csetjmp>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};

namespace {

constexpr size_t kStack = 64 * 1024;         // per fiber
constexpr size_t kGuard = 4096;              // PROT_NONE page below each stack
constexpr size_t kMaxThreads = 1024;
constexpr size_t kCanary = 1024;             // bytes before and after every buffer
constexpr uint8_t kCanaryByte = 0xCD;
constexpr size_t kMaxDynSmem = 227 * 1024;   // the sm_90 opt-in limit per block

enum State : uint8_t { RUNNABLE, AT_BARRIER, AT_WARP, DONE };

struct Fiber {
    ucontext_t ctx;  // the first entry only
    jmp_buf jb;      // where it waits
    bool started;
    char* stack;
    uint3 tid;
    uint32_t linear, warp, lane;
    State state;
    const void* site;  // return address of the barrier / warp op it waits at
    // warp op in flight
    int wop, warg, wwidth, spred;
    unsigned wmask;
    uint64_t wval, wres;
};

struct Buffer {
    uintptr_t lo, hi;  // user range; canaries lie in [lo - kCanary, lo) and [hi, hi + kCanary)
    uint64_t id;
};

// Shadow of one shared-memory byte. Epochs are per OS thread and only grow, so
// a shadow left over from an earlier barrier interval, block or launch never matches.
struct ByteShadow {
    uint64_t w_ep, r_ep;
    uint32_t w_tid, r_tid;
    uint32_t w_wep, r_wep;
    uint8_t r_multi;
};
constexpr size_t kPage = 4096;

struct Launch {
    const char* kernel = nullptr;
    void (*tramp)(void**) = nullptr;
    void** args = nullptr;
    dim3 grid{}, block{};
    uint3 bidx{};
    size_t smem = 0;
    uint32_t nthreads = 0, nwarps = 0;
    Fiber* fibers = nullptr;
    Fiber* cur = nullptr;
    jmp_buf sched;  // the scheduler, while a fiber runs
    bool failed = false;
    std::string error;
    std::vector<Buffer> buffers;
    std::vector<uint32_t> warp_ep;
    std::vector<std::pair<uintptr_t, uintptr_t>> dyn;  // this thread's dynamic shared arrays
    // cp.async copies issued and not yet completed by a cp.async.wait_group of their thread
    struct AsyncCopy {
        uintptr_t dst;
        const void* src;
        uint32_t n, thread, group;
    };
    std::vector<AsyncCopy> async;
    std::vector<uint32_t> async_committed;  // per thread: groups committed so far
};

// Per OS thread: fiber stacks (one mapping), the launch in progress, shadow pages.
struct ThreadState {
    char* region = nullptr;
    size_t region_len = 0;
    std::vector<Fiber> fibers;
    Launch* launch = nullptr;
    uint64_t epoch = 1;
    std::unordered_map<uintptr_t, std::unique_ptr<ByteShadow[]>> shadow;
    ~ThreadState() {
        if (region) munmap(region, region_len);
    }
};
thread_local ThreadState g_ts;
thread_local Launch* g_launch = nullptr;  // non-null while kernel code runs

std::mutex g_buf_mu;
std::vector<Buffer> g_buffers;
uint64_t g_next_buf = 1;

struct Registered {
    void* (*addr)();
    size_t bytes;
};
std::mutex g_dyn_mu;
std::vector<Registered> g_dyn;

std::string fmt(const char* f, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, f);
    vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

std::string where(const Launch* L, const Fiber* f) {
    std::string s = fmt("kernel %s, block (%u,%u,%u)", L->kernel, L->bidx.x, L->bidx.y, L->bidx.z);
    if (f) s += fmt(", thread (%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z);
    return s;
}

std::string tid_str(const Launch* L, uint32_t linear) {
    const Fiber& f = L->fibers[linear];
    return fmt("(%u,%u,%u)", f.tid.x, f.tid.y, f.tid.z);
}

// Record the first error and, when called from a fiber, leave it for good:
// the scheduler abandons the launch (never resumes any fiber of it).
void fail(Launch* L, const std::string& msg) {
    if (!L->failed) {
        L->failed = true;
        L->error = msg;
    }
    if (L->cur) {
        _longjmp(L->sched, 1);  // a failed launch never resumes its fibers
    }
}

bool ensure_stacks(uint32_t n) {
    ThreadState& ts = g_ts;
    if (ts.fibers.size() >= n) return true;
    if (ts.region) munmap(ts.region, ts.region_len);
    size_t len = (size_t)kMaxThreads * (kStack + kGuard);
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    ts.region = (char*)p;
    ts.region_len = len;
    ts.fibers.assign(kMaxThreads, Fiber{});
    for (size_t i = 0; i < kMaxThreads; i++) {
        char* base = ts.region + i * (kStack + kGuard);
        mprotect(base, kGuard, PROT_NONE);
        ts.fibers[i].stack = base + kGuard;
    }
    return true;
}

void fiber_main() {
    Launch* L = g_launch;
    L->tramp(L->args);
    L->cur->state = DONE;
    _longjmp(L->sched, 1);  // a finished fiber is never resumed
}

Fiber* current(const char* what) {
    Launch* L = g_launch;
    if (!L || !L->cur) {
        fprintf(stderr, "kf-emu: %s called outside an emulated kernel\n", what);
        abort();
    }
    return L->cur;
}

void yield(Launch* L, Fiber* f, State s, const void* site) {
    f->state = s;
    f->site = site;
    if (!_setjmp(f->jb)) _longjmp(L->sched, 1);
}

// ------------------------------------------------------------------ memory checks

bool in_stacks(uintptr_t a) {
    const ThreadState& ts = g_ts;
    return a >= (uintptr_t)ts.region && a < (uintptr_t)ts.region + ts.region_len;
}

ByteShadow* shadow_of(uintptr_t a) {
    auto& slot = g_ts.shadow[a / kPage];
    if (!slot) slot.reset(new ByteShadow[kPage]());
    return &slot[a % kPage];
}

void check_shared(Launch* L, Fiber* f, uintptr_t a, size_t n, bool write) {
    uint64_t ep = g_ts.epoch;
    uint32_t t = f->linear, wep = L->warp_ep[f->warp];
    auto unordered = [&](uint32_t other, uint32_t other_wep) {
        // threads of one warp are ordered by a warp collective between the accesses
        return other != t && (L->fibers[other].warp != f->warp || other_wep == wep);
    };
    for (size_t i = 0; i < n; i++) {
        ByteShadow* s = shadow_of(a + i);
        const char* kind = nullptr;
        uint32_t other = 0;
        if (s->w_ep == ep && unordered(s->w_tid, s->w_wep)) {
            kind = write ? "write after write" : "read after write";
            other = s->w_tid;
        } else if (write && s->r_ep == ep && (unordered(s->r_tid, s->r_wep) || (s->r_multi && s->r_tid != t))) {
            kind = "write after read";
            other = s->r_tid;
        }
        if (kind) {
            fail(L, fmt("%s: shared-memory race (%s) at %p: thread %s %s %zu bytes; thread %s %s the same byte "
                        "with no __syncthreads() between",
                        where(L, f).c_str(), kind, (void*)a, tid_str(L, t).c_str(), write ? "writes" : "reads", n,
                        tid_str(L, other).c_str(), strcmp(kind, "write after read") == 0 ? "read" : "wrote"));
            return;
        }
        if (write) {
            s->w_ep = ep;
            s->w_tid = t;
            s->w_wep = wep;
        } else if (s->r_ep != ep) {
            s->r_ep = ep;
            s->r_tid = t;
            s->r_wep = wep;
            s->r_multi = 0;
        } else if (s->r_tid != t) {
            s->r_multi = 1;
            s->r_tid = t;
            s->r_wep = wep;
        }
    }
}

// Every load/store of kernel code comes here (through the __tsan_* hooks).
inline void on_access(const void* p, size_t n, bool write) {
    Launch* L = g_launch;
    if (!L || !L->cur) return;
    uintptr_t a = (uintptr_t)p;
    if (in_stacks(a)) return;  // locals of a fiber
    Fiber* f = L->cur;
    for (const Buffer& b : L->buffers) {
        if (a + n <= b.lo - kCanary || a >= b.hi + kCanary) continue;
        if (a >= b.lo && a + n <= b.hi) return;  // global memory: in bounds
        long long off = (long long)(a - b.lo);
        fail(L, fmt("%s: out-of-bounds %s of %zu bytes at byte offset %lld of device buffer #%" PRIu64
                    " (%zu bytes)",
                    where(L, f).c_str(), write ? "write" : "read", n, off, b.id, (size_t)(b.hi - b.lo)));
        return;
    }
    for (auto& d : L->dyn) {
        if (a + n > d.first && a < d.second) {
            if (a + n > d.first + L->smem) {
                fail(L, fmt("%s: %s of %zu bytes at byte offset %zu of dynamic shared memory, beyond the %zu "
                            "bytes given at launch",
                            where(L, f).c_str(), write ? "write" : "read", n, (size_t)(a - d.first), L->smem));
                return;
            }
            break;
        }
    }
    // a byte a cp.async has not landed in yet: only cp.async.wait_group makes it visible
    for (const auto& c : L->async) {
        if (a + n > c.dst && a < c.dst + c.n) {
            fail(L, fmt("%s: %s of shared memory that a cp.async of thread %s has not completed "
                        "(a missing cp.async.wait_group before the access)",
                        where(L, f).c_str(), write ? "write" : "read", tid_str(L, c.thread).c_str()));
            return;
        }
    }
    // static or dynamic shared memory (or another global of the kernel file)
    check_shared(L, f, a, n, write);
}

bool canaries_intact(const Buffer& b, std::string* what) {
    const uint8_t* lo = (const uint8_t*)(b.lo - kCanary);
    const uint8_t* hi = (const uint8_t*)b.hi;
    for (size_t i = 0; i < kCanary; i++) {
        if (lo[i] != kCanaryByte) {
            *what = fmt("byte offset %lld", (long long)i - (long long)kCanary);
            return false;
        }
        if (hi[i] != kCanaryByte) {
            *what = fmt("byte offset %zu", (size_t)(b.hi - b.lo) + i);
            return false;
        }
    }
    return true;
}

// ------------------------------------------------------------------ scheduling

// ------------------------------------------------------------------ tensor-core collectives
// The fragments follow the PTX ISA layouts (mma.m16n8k16 with .bf16 inputs and .f32
// accumulators; ldmatrix .m8n8 .b16): lane l, group g = l / 4, t = l % 4.
constexpr int kOpMma = 9, kOpLdmatrix = 10, kOpLdmatrixT = 11;
struct MmaFrag {  // kf_emu_mma_frag of cuda_emu.h
    uint32_t a[4], b[2];
    float c[4], d[4];
};
struct LdmFrag {  // kf_emu_ldm_frag of cuda_emu.h
    uint64_t addr;
    uint32_t r[4];
};
inline float bf16_f32(uint32_t h) {
    uint32_t u = (h & 0xffffu) << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}

// D = A B + C over the warp's fragments (f32 sums in k order; a GPU's order is unspecified).
bool warp_mma_bf16(Launch* L, uint32_t base) {
    float A[16][16], B[16][8], C[16][8];
    for (uint32_t l = 0; l < 32; l++) {
        const MmaFrag* fr = (const MmaFrag*)L->fibers[base + l].wval;
        uint32_t g = l / 4, t = l % 4;
        for (int i = 0; i < 8; i++) {
            int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
            int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = bf16_f32(fr->a[i / 2] >> (16 * (i & 1)));
        }
        for (int i = 0; i < 4; i++) B[t * 2 + (i & 1) + (i >= 2 ? 8 : 0)][g] = bf16_f32(fr->b[i / 2] >> (16 * (i & 1)));
        for (int i = 0; i < 4; i++) C[i < 2 ? g : g + 8][t * 2 + (i & 1)] = fr->c[i];
    }
    for (uint32_t l = 0; l < 32; l++) {
        MmaFrag* fr = (MmaFrag*)L->fibers[base + l].wval;
        uint32_t g = l / 4, t = l % 4;
        for (int i = 0; i < 4; i++) {
            int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
            float acc = C[row][col];
            for (int k = 0; k < 16; k++) acc += A[row][k] * B[k][col];
            fr->d[i] = acc;
        }
    }
    return true;
}

// ldmatrix .x`count` (1, 2, 4), `trans` for .trans: lane 8 j + r gives the address of row r of
// matrix j (16 bytes, 16-byte aligned, shared memory); lane l gets in r[j] the pair at row
// l / 4, columns 2 (l % 4) and + 1 of matrix j (of its transpose with .trans).
bool warp_ldmatrix(Launch* L, uint32_t base, bool trans, int count) {
    if (count != 1 && count != 2 && count != 4) {
        L->error = fmt("%s: ldmatrix .x%d (1, 2 or 4)", where(L, &L->fibers[base]).c_str(), count);
        L->failed = true;
        return false;
    }
    uint16_t M[4][8][8];
    for (int j = 0; j < count; j++) {
        for (int r = 0; r < 8; r++) {
            Fiber* src = &L->fibers[base + 8 * j + r];
            uintptr_t a = ((const LdmFrag*)src->wval)->addr;
            if (a % 16) {
                L->error = fmt("%s: ldmatrix row address %p is not 16-byte aligned", where(L, src).c_str(), (void*)a);
                L->failed = true;
                return false;
            }
            for (const auto& c : L->async) {
                if (a + 16 > c.dst && a < c.dst + c.n) {
                    L->error = fmt("%s: ldmatrix reads shared memory that a cp.async of thread %s has not "
                                   "completed (a missing cp.async.wait_group before the access)",
                                   where(L, src).c_str(), tid_str(L, c.thread).c_str());
                    L->failed = true;
                    return false;
                }
            }
            check_shared(L, src, a, 16, false);
            if (L->failed) return false;
            memcpy(M[j][r], (const void*)a, 16);
        }
    }
    for (uint32_t l = 0; l < 32; l++) {
        LdmFrag* fr = (LdmFrag*)L->fibers[base + l].wval;
        uint32_t row = l / 4, col = 2 * (l % 4);
        for (int j = 0; j < count; j++) {
            uint16_t lo = trans ? M[j][col][row] : M[j][row][col];
            uint16_t hi = trans ? M[j][col + 1][row] : M[j][row][col + 1];
            fr->r[j] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
    }
    return true;
}

// Complete the warp collectives whose lanes have all arrived; false when none could.
// Sets an error on a divergent collective.
bool resolve_warps(Launch* L) {
    bool released = false;
    for (uint32_t w = 0; w < L->nwarps; w++) {
        uint32_t base = w * 32, nl = std::min<uint32_t>(32, L->nthreads - base);
        unsigned exist = nl == 32 ? 0xffffffffu : ((1u << nl) - 1);
        unsigned done_group = 0;
        for (uint32_t l = 0; l < nl; l++) {
            Fiber& f = L->fibers[base + l];
            if (f.state != AT_WARP || (done_group >> l & 1)) continue;
            unsigned group = f.wmask & exist;
            if (!(group >> l & 1)) {
                L->error = fmt("%s: warp collective with mask 0x%08x that does not contain the calling lane %u",
                               where(L, &f).c_str(), f.wmask, l);
                L->failed = true;
                return false;
            }
            for (uint32_t j = 0; j < nl; j++) {
                if (!(group >> j & 1)) continue;
                Fiber& g = L->fibers[base + j];
                if (g.state != AT_WARP || g.site != f.site || g.wop != f.wop || g.wmask != f.wmask) {
                    const char* why = g.state == DONE         ? "has exited"
                                      : g.state == AT_BARRIER ? "waits at __syncthreads()"
                                      : g.wop != f.wop || g.site != f.site
                                          ? "waits at a different warp collective"
                                          : "uses a different mask";
                    L->error = fmt("%s: divergent warp collective: lane %u waits at a warp operation with mask "
                                   "0x%08x, lane %u (thread %s) named in the mask %s",
                                   where(L, &f).c_str(), l, f.wmask, j, tid_str(L, base + j).c_str(), why);
                    L->failed = true;
                    return false;
                }
            }
            // tensor-core and matrix-load collectives: the whole warp, fragments through pointers
            if (f.wop >= kOpMma && f.wop <= kOpLdmatrixT) {
                if (group != 0xffffffffu || nl != 32) {
                    L->error = fmt("%s: %s needs all 32 lanes of a full warp (mask 0x%08x)", where(L, &f).c_str(),
                                   f.wop == kOpMma ? "mma.sync" : "ldmatrix", f.wmask);
                    L->failed = true;
                    return false;
                }
                bool ok = f.wop == kOpMma ? warp_mma_bf16(L, base) : warp_ldmatrix(L, base, f.wop == kOpLdmatrixT, f.warg);
                if (!ok) return false;
                for (uint32_t j = 0; j < nl; j++) L->fibers[base + j].state = RUNNABLE;
                done_group |= group;
                L->warp_ep[w]++;
                released = true;
                continue;
            }
            // every lane of the group has deposited its value: compute the results
            unsigned vote = 0;
            for (uint32_t j = 0; j < nl; j++)
                if ((group >> j & 1) && L->fibers[base + j].wval) vote |= 1u << j;
            for (uint32_t j = 0; j < nl; j++) {
                if (!(group >> j & 1)) continue;
                Fiber& g = L->fibers[base + j];
                int width = g.wwidth, seg = j & ~(uint32_t)(width - 1);
                int src = -1;
                switch (g.wop) {
                    case 1: src = seg + (g.warg & (width - 1)); break;                            // idx
                    case 2: src = (int)j - g.warg; if (src < seg) src = j; break;                 // up
                    case 3: src = (int)j + g.warg; if (src >= seg + width) src = j; break;        // down
                    case 4: src = (int)j ^ g.warg; if (src < seg || src >= seg + width) src = j; break;  // xor
                    default: break;
                }
                if (g.wop >= 1 && g.wop <= 4) {
                    if (src < 0 || src >= 32 || !(group >> src & 1)) {
                        L->error = fmt("%s: shuffle reads lane %d, which is not active in mask 0x%08x (value "
                                       "undefined on a GPU)",
                                       where(L, &g).c_str(), src, g.wmask);
                        L->failed = true;
                        return false;
                    }
                    g.wres = L->fibers[base + src].wval;
                } else if (g.wop == 5) {
                    g.wres = vote;
                } else if (g.wop == 6) {
                    g.wres = vote != 0;
                } else if (g.wop == 7) {
                    g.wres = vote == group;
                } else {
                    g.wres = 0;  // __syncwarp
                }
            }
            for (uint32_t j = 0; j < nl; j++)
                if (group >> j & 1) L->fibers[base + j].state = RUNNABLE;
            done_group |= group;
            L->warp_ep[w]++;
            released = true;
        }
    }
    return released;
}

void run_block(Launch* L) {
    uint32_t n = L->nthreads;
    ++g_ts.epoch;
    ucontext_t tmpl;
    getcontext(&tmpl);
    for (uint32_t i = 0; i < n; i++) {
        Fiber& f = L->fibers[i];
        f.linear = i;
        f.tid = {i % L->block.x, (i / L->block.x) % L->block.y, i / (L->block.x * L->block.y)};
        f.warp = i / 32;
        f.lane = i % 32;
        f.state = RUNNABLE;
        f.started = false;
        f.site = nullptr;
        f.ctx = tmpl;
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, fiber_main, 0);
    }
    for (auto& d : L->dyn) memset((void*)d.first, 0xFF, L->smem);  // NaN-filled, like garbage
    L->async.clear();
    L->async_committed.assign(n, 0);
    std::fill(L->warp_ep.begin(), L->warp_ep.end(), 0);
    for (;;) {
        for (uint32_t i = 0; i < n; i++) {
            Fiber& f = L->fibers[i];
            if (f.state != RUNNABLE) continue;
            L->cur = &f;
            if (!_setjmp(L->sched)) {
                if (!f.started) {
                    f.started = true;
                    setcontext(&f.ctx);  // onto its stack, into fiber_main
                }
                _longjmp(f.jb, 1);
            }
            L->cur = nullptr;
            if (L->failed) return;
        }
        if (resolve_warps(L)) continue;
        if (L->failed) return;
        uint32_t done = 0, at_bar = 0, at_warp = 0;
        const Fiber* first_bar = nullptr;
        const Fiber* other = nullptr;
        for (uint32_t i = 0; i < n; i++) {
            const Fiber& f = L->fibers[i];
            if (f.state == DONE) done++;
            if (f.state == AT_WARP) at_warp++;
            if (f.state == AT_BARRIER) {
                at_bar++;
                if (!first_bar) first_bar = &f;
                else if (f.site != first_bar->site && !other) other = &f;
            }
        }
        if (done == n) return;
        if (at_bar == n && !other) {
            // every thread at the same __syncthreads(): the reductions, then release
            int cnt = 0, all = 1, any = 0;
            for (uint32_t i = 0; i < n; i++) {
                int p = L->fibers[i].spred != 0;
                cnt += p;
                all &= p;
                any |= p;
            }
            for (uint32_t i = 0; i < n; i++) {
                Fiber& f = L->fibers[i];
                f.state = RUNNABLE;
                f.wres = f.wop == 1 ? cnt : f.wop == 2 ? all : f.wop == 3 ? any : 0;
            }
            g_ts.epoch++;
            continue;
        }
        // nobody can move: a barrier or collective that not every thread reaches
        const Fiber* odd = nullptr;
        const char* why = "";
        for (uint32_t i = 0; i < n && !odd; i++) {
            const Fiber& f = L->fibers[i];
            if (f.state == DONE) odd = &f, why = "has exited";
            else if (f.state == AT_WARP) odd = &f, why = "waits at a warp collective";
        }
        if (other) odd = other, why = "waits at a different __syncthreads()";
        if (first_bar) {
            L->error = fmt("%s: divergent __syncthreads(): %u of %u threads wait at it (first: thread %s), while "
                           "thread %s %s (a deadlock on a GPU)",
                           where(L, nullptr).c_str(), at_bar, n, tid_str(L, first_bar->linear).c_str(),
                           odd ? tid_str(L, odd->linear).c_str() : "?", why);
        } else {
            L->error = fmt("%s: deadlock: %u threads wait at warp collectives that cannot complete",
                           where(L, nullptr).c_str(), at_warp);
        }
        L->failed = true;
        return;
    }
}

}  // namespace

// ------------------------------------------------------------------ device-side API

extern "C" {

uint3 kf_emu_thread_idx(void) { return current("threadIdx")->tid; }
uint3 kf_emu_block_idx(void) {
    current("blockIdx");
    return g_launch->bidx;
}
dim3 kf_emu_block_dim(void) {
    current("blockDim");
    return g_launch->block;
}
dim3 kf_emu_grid_dim(void) {
    current("gridDim");
    return g_launch->grid;
}

void __syncthreads(void) {
    Fiber* f = current("__syncthreads");
    f->wop = 0;
    f->spred = 0;
    yield(g_launch, f, AT_BARRIER, __builtin_return_address(0));
}

int kf_emu_syncthreads_op(int op, int pred) {
    Fiber* f = current("__syncthreads_count/and/or");
    f->wop = op;
    f->spred = pred;
    yield(g_launch, f, AT_BARRIER, __builtin_return_address(0));
    return (int)f->wres;
}

uint64_t kf_emu_warp_op(int op, unsigned mask, uint64_t bits, int arg, int width) {
    Fiber* f = current("a warp collective");
    if (width <= 0 || width > 32 || (width & (width - 1))) {
        fail(g_launch, fmt("%s: shuffle width %d is not a power of two in 1..32", where(g_launch, f).c_str(), width));
    }
    f->wop = op;
    f->wmask = mask;
    f->wval = bits;
    f->warg = arg;
    f->wwidth = width;
    yield(g_launch, f, AT_WARP, __builtin_return_address(0));
    return f->wres;
}

void kf_emu_syncwarp(unsigned mask) {
    Fiber* f = current("__syncwarp");
    f->wop = 8;
    f->wmask = mask;
    f->wval = 0;
    f->warg = 0;
    f->wwidth = 32;
    yield(g_launch, f, AT_WARP, __builtin_return_address(0));
}

unsigned kf_emu_activemask(void) {
    Fiber* f = current("__activemask");
    uint32_t base = f->warp * 32, nl = std::min<uint32_t>(32, g_launch->nthreads - base);
    unsigned m = 0;
    for (uint32_t j = 0; j < nl; j++)
        if (g_launch->fibers[base + j].state != DONE) m |= 1u << j;
    return m;
}

// cp.async (global -> shared, 4, 8 or 16 bytes): checked like a read of the source now,
// recorded as in flight into the destination; any access to those bytes fails until the
// issuing thread's cp.async.wait_group completes its group (the copy is made then).
void kf_emu_cp_async(void* dst, const void* src, unsigned n) {
    Launch* L = g_launch;
    Fiber* f = current("cp.async");
    if (n != 4 && n != 8 && n != 16) {
        fail(L, fmt("%s: cp.async of %u bytes (4, 8 or 16)", where(L, f).c_str(), n));
    }
    if (((uintptr_t)dst | (uintptr_t)src) % n) {
        fail(L, fmt("%s: cp.async of %u bytes with a misaligned address", where(L, f).c_str(), n));
    }
    on_access(src, n, false);
    // the destination must be shared memory no copy is already landing in
    on_access(dst, n, true);
    if (L->failed) return;
    L->async.push_back({(uintptr_t)dst, src, n, f->linear, L->async_committed[f->linear]});
}

void kf_emu_cp_async_commit(void) {
    Fiber* f = current("cp.async.commit_group");
    g_launch->async_committed[f->linear]++;
}

// Completes this thread's copies in committed groups older than its `newer` most recent.
void kf_emu_cp_async_wait(unsigned newer) {
    Launch* L = g_launch;
    Fiber* f = current("cp.async.wait_group");
    uint32_t committed = L->async_committed[f->linear];
    uint32_t limit = committed > newer ? committed - newer : 0;
    std::vector<Launch::AsyncCopy> keep;
    std::vector<Launch::AsyncCopy> land;
    for (const auto& c : L->async) {
        if (c.thread == f->linear && c.group < limit) land.push_back(c);
        else keep.push_back(c);
    }
    L->async.swap(keep);
    for (const auto& c : land) {
        memcpy((void*)c.dst, c.src, c.n);
        check_shared(L, f, c.dst, c.n, true);  // a write by this thread, for the race checks
    }
}

void kf_emu_trap(const char* what) {
    Fiber* f = current(what);
    fail(g_launch, fmt("%s: %s", where(g_launch, f).c_str(), what));
    abort();
}

uint64_t kf_emu_atomic(int op, int type, void* p, uint64_t a, uint64_t b) {
    Launch* L = g_launch;
    Fiber* f = current("an atomic");
    size_t n = (type == 3 || type == 5) ? 8 : 4;
    // bounds as for plain accesses, but no race bookkeeping: atomics never race
    uintptr_t ad = (uintptr_t)p;
    for (const Buffer& bf : L->buffers) {
        if (ad + n <= bf.lo - kCanary || ad >= bf.hi + kCanary) continue;
        if (!(ad >= bf.lo && ad + n <= bf.hi))
            fail(L, fmt("%s: out-of-bounds atomic at byte offset %lld of device buffer #%" PRIu64,
                        where(L, f).c_str(), (long long)(ad - bf.lo), bf.id));
        break;
    }
    if (ad % n) fail(L, fmt("%s: misaligned atomic at %p", where(L, f).c_str(), p));
    uint64_t old = 0;
    memcpy(&old, p, n);
    auto rmw = [&](auto cur, auto va, auto vb) -> decltype(cur) {
        switch (op) {
            case 1: return cur + va;
            case 2: return cur > va ? cur : va;
            case 3: return cur < va ? cur : va;
            case 4: return cur == va ? vb : cur;
            default: return va;
        }
    };
    auto as = [&](auto tag) {
        using T = decltype(tag);
        T cur, va, vb;
        memcpy(&cur, &old, sizeof(T));
        memcpy(&va, &a, sizeof(T));
        memcpy(&vb, &b, sizeof(T));
        T r = rmw(cur, va, vb);
        memcpy(p, &r, sizeof(T));
    };
    switch (type) {
        case 1: as(int32_t{}); break;
        case 2: as(uint32_t{}); break;
        case 3: as(uint64_t{}); break;
        case 4: as(float{}); break;
        case 5: as(double{}); break;
        default: fail(L, "unknown atomic type");
    }
    return old;
}

// ------------------------------------------------------------------ TSan hooks
// Called by the instrumented kernel code (compiled with -fsanitize=thread).

void __tsan_init(void) {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit(void) {}
#define KF_HOOK(N)                                                             \
    void __tsan_read##N(void* p) { on_access(p, N, false); }                   \
    void __tsan_write##N(void* p) { on_access(p, N, true); }                   \
    void __tsan_unaligned_read##N(void* p) { on_access(p, N, false); }         \
    void __tsan_unaligned_write##N(void* p) { on_access(p, N, true); }         \
    void __tsan_volatile_read##N(void* p) { on_access(p, N, false); }          \
    void __tsan_volatile_write##N(void* p) { on_access(p, N, true); }
KF_HOOK(1)
KF_HOOK(2)
KF_HOOK(4)
KF_HOOK(8)
KF_HOOK(16)
void __tsan_read_range(void* p, unsigned long n) { on_access(p, n, false); }
void __tsan_write_range(void* p, unsigned long n) { on_access(p, n, true); }
// Atomic loads/stores that instrumented code may emit (e.g. for static guards):
// plain accesses here, fibers never run concurrently.
#define KF_ATOMIC_LS(N, T)                                                                      \
    T __tsan_atomic##N##_load(const volatile T* a, int) { return *a; }                          \
    void __tsan_atomic##N##_store(volatile T* a, T v, int) { *a = v; }
KF_ATOMIC_LS(8, uint8_t)
KF_ATOMIC_LS(16, uint16_t)
KF_ATOMIC_LS(32, uint32_t)
KF_ATOMIC_LS(64, uint64_t)
void __tsan_vptr_read(void**) {}
void __tsan_vptr_update(void**, void*) {}

// ------------------------------------------------------------------ host-side API (Rust)

// Registered by the generated launcher of each .cu: this thread's address of
// one `extern __shared__` array (thread_local) and its capacity.
void kf_emu_register_dyn_smem(void* (*addr)(), size_t bytes) {
    std::lock_guard<std::mutex> g(g_dyn_mu);
    g_dyn.push_back({addr, bytes});
}

size_t kf_emu_max_dyn_smem(void) { return kMaxDynSmem; }

// A device buffer of `bytes` with canary zones on both sides; its contents
// start as 0xFF bytes (NaN for floats) so unwritten outputs show.
void* kf_emu_alloc(size_t bytes, uint64_t* id) {
    size_t total = bytes + 2 * kCanary;
    uint8_t* raw = (uint8_t*)aligned_alloc(256, (total + 255) / 256 * 256);
    if (!raw) return nullptr;
    memset(raw, kCanaryByte, kCanary);
    memset(raw + kCanary, 0xFF, bytes);
    memset(raw + kCanary + bytes, kCanaryByte, kCanary);
    std::lock_guard<std::mutex> g(g_buf_mu);
    Buffer b{(uintptr_t)(raw + kCanary), (uintptr_t)(raw + kCanary + bytes), g_next_buf++};
    g_buffers.push_back(b);
    *id = b.id;
    return raw + kCanary;
}

void kf_emu_free(void* p) {
    if (!p) return;
    {
        std::lock_guard<std::mutex> g(g_buf_mu);
        auto it = std::find_if(g_buffers.begin(), g_buffers.end(), [&](const Buffer& b) { return b.lo == (uintptr_t)p; });
        if (it != g_buffers.end()) g_buffers.erase(it);
    }
    free((uint8_t*)p - kCanary);
}

// Run `tramp(args)` over the grid. Returns 0, or -1 with a message in err.
// `bufs` are the device buffers the arguments point into: bounds are checked
// against them, and their canaries after the launch.
int kf_emu_launch(const char* kernel, void (*tramp)(void**), void** args, const unsigned* grid, const unsigned* block,
                  size_t smem, void* const* bufs, size_t nbufs, char* err, size_t err_len) {
    auto bad = [&](const std::string& m) {
        snprintf(err, err_len, "%s", m.c_str());
        return -1;
    };
    if (g_launch) return bad(fmt("kernel %s: launched from inside an emulated kernel", kernel));
    uint64_t nthreads = (uint64_t)block[0] * block[1] * block[2];
    if (nthreads == 0 || nthreads > kMaxThreads || block[2] > 64)
        return bad(fmt("kernel %s: invalid block (%u,%u,%u): 1..1024 threads, z <= 64", kernel, block[0], block[1],
                       block[2]));
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 2147483647u || grid[1] > 65535 || grid[2] > 65535)
        return bad(fmt("kernel %s: invalid grid (%u,%u,%u)", kernel, grid[0], grid[1], grid[2]));
    if (smem > kMaxDynSmem)
        return bad(fmt("kernel %s: %zu bytes of dynamic shared memory, more than the %zu a block can have", kernel,
                       smem, kMaxDynSmem));
    if (!ensure_stacks((uint32_t)nthreads)) return bad("kf-emu: cannot map the fiber stacks");

    Launch L;
    L.kernel = kernel;
    L.tramp = tramp;
    L.args = args;
    L.grid = {grid[0], grid[1], grid[2]};
    L.block = {block[0], block[1], block[2]};
    L.smem = smem;
    L.nthreads = (uint32_t)nthreads;
    L.nwarps = (L.nthreads + 31) / 32;
    L.fibers = g_ts.fibers.data();
    L.warp_ep.assign(L.nwarps, 0);
    {
        std::lock_guard<std::mutex> g(g_buf_mu);
        for (size_t i = 0; i < nbufs; i++)
            for (const Buffer& b : g_buffers)
                if (b.lo == (uintptr_t)bufs[i]) L.buffers.push_back(b);
    }
    {
        std::lock_guard<std::mutex> g(g_dyn_mu);
        for (auto& r : g_dyn) {
            uintptr_t a = (uintptr_t)r.addr();
            L.dyn.push_back({a, a + r.bytes});
        }
    }
    g_launch = &L;
    for (unsigned z = 0; z < grid[2] && !L.failed; z++)
        for (unsigned y = 0; y < grid[1] && !L.failed; y++)
            for (unsigned x = 0; x < grid[0] && !L.failed; x++) {
                L.bidx = {x, y, z};
                run_block(&L);
            }
    g_launch = nullptr;
    // writes that bypassed the hooks (memcpy/memset in kernel code) still hit a canary
    if (!L.failed) {
        for (const Buffer& b : L.buffers) {
            std::string what;
            if (!canaries_intact(b, &what)) {
                L.failed = true;
                L.error = fmt("kernel %s: out-of-bounds write found after the launch: canary of device buffer #%" PRIu64
                              " (%zu bytes) overwritten at %s",
                              kernel, b.id, (size_t)(b.hi - b.lo), what.c_str());
                break;
            }
        }
    }
    if (L.failed) return bad(L.error);
    return 0;
}

}  // extern "C"
