// A caching allocator for CPU tensors, used while a model trains on the CPU: freed blocks are kept in
// bins by size and handed out again, instead of going back to glibc's malloc.
//
// Why: a training step allocates and frees the same few hundred activation and gradient buffers every
// step, many of them hundreds of KB. glibc serves those with memalign, splits and coalesces them again
// (malloc_consolidate), or maps and unmaps fresh pages: perf put 6% of a shakespeare-char step in
// malloc and free, and the same run was 6-10% faster with tcmalloc preloaded. Caching the tensors'
// blocks here gained 2% (oneDNN's own allocations still go to malloc; BENCHMARKS.md).
//
// Blocks are 64-byte aligned like c10's default allocator; each carries its size class in a 64-byte
// header before the data, so a tensor's data pointer is also its deleter's context (as PyTorch expects
// of a simple allocation). Sizes round up to classes 1/8 of a power of two apart (at most 12.5% waste),
// so batches of varying length share blocks. The free blocks held are capped: a free that would exceed
// the cap first returns every held block to the system.
//
// Registered as pocketlm::cpu_caching_allocator(bool enable, int cap_bytes) and
// pocketlm::cpu_cached_bytes() -> int (the free bytes held); train/ turns it on for a run and off after.
// Blocks still alive when it is turned off go back to the system when freed.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kAlignment = 64;  // c10's alignment for CPU tensors (AVX-512 loads)
constexpr size_t kHeader = kAlignment;

size_t size_class(size_t n) {
  if (n <= 4096) return (n + kAlignment - 1) / kAlignment * kAlignment;
  size_t top = size_t(1) << (63 - __builtin_clzll(n - 1));  // the largest power of two below n
  const size_t step = top / 8;
  return (n + step - 1) / step * step;
}

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &release, c10::Device(c10::DeviceType::CPU)};
    const size_t size = size_class(n);
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto bin = free_.find(size);
      if (bin != free_.end() && !bin->second.empty()) {
        data = bin->second.back();
        bin->second.pop_back();
        held_ -= size;
      }
    }
    if (data == nullptr) {
      void* raw = nullptr;
      if (posix_memalign(&raw, kAlignment, size + kHeader) != 0 || raw == nullptr)
        TORCH_CHECK(false, "pocketlm's CPU allocator: out of memory allocating ", n, " bytes");
      *static_cast<size_t*>(raw) = size;
      data = static_cast<char*>(raw) + kHeader;
    }
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t held() {
    std::lock_guard<std::mutex> lock(mutex_);
    return held_;
  }

  // turn caching on or off (off gives every held block back)
  void set(bool enable, int64_t cap) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      enabled_ = enable;
      cap_ = size_t(std::max<int64_t>(cap, 0));
      if (!enable) take_all(drop);
    }
    for (void* data : drop) std::free(static_cast<char*>(data) - kHeader);
  }

 private:
  static void release(void* data) {
    if (data != nullptr) instance().give_back(data);
  }

  void give_back(void* data) {
    const size_t size = *reinterpret_cast<size_t*>(static_cast<char*>(data) - kHeader);
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (enabled_ && size <= cap_) {
        if (held_ + size > cap_) take_all(drop);
        free_[size].push_back(data);
        held_ += size;
        data = nullptr;
      }
    }
    for (void* d : drop) std::free(static_cast<char*>(d) - kHeader);
    if (data != nullptr) std::free(static_cast<char*>(data) - kHeader);
  }

  // every held block into `out`, the bins emptied (called with the mutex held)
  void take_all(std::vector<void*>& out) {
    for (auto& [size, blocks] : free_) out.insert(out.end(), blocks.begin(), blocks.end());
    free_.clear();
    held_ = 0;
  }

 public:
  static CachingCPUAllocator& instance() {
    static CachingCPUAllocator* allocator = new CachingCPUAllocator();  // never destroyed: tensors may outlive exit
    return *allocator;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t held_ = 0, cap_ = 0;
  bool enabled_ = false;
};

c10::Allocator* g_previous = nullptr;

void cpu_caching_allocator(bool enable, int64_t cap_bytes) {
  CachingCPUAllocator& ours = CachingCPUAllocator::instance();
  ours.set(enable, cap_bytes);
  if (enable && c10::GetCPUAllocator() != &ours) {
    g_previous = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&ours, /*priority=*/0);
  } else if (!enable && c10::GetCPUAllocator() == &ours && g_previous != nullptr) {
    c10::SetCPUAllocator(g_previous, /*priority=*/0);
  }
}

int64_t cpu_cached_bytes() { return int64_t(CachingCPUAllocator::instance().held()); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(pocketlm, m) {
  m.def("cpu_caching_allocator(bool enable, int cap_bytes) -> ()", &cpu_caching_allocator);
  m.def("cpu_cached_bytes() -> int", &cpu_cached_bytes);
}
