# The addon is built for the baseline ISA (x86-64: SSE2; other architectures: plain -O3), and
# the kernels once per ISA variant (src/variant.h) as static libraries with their own flags:
# portable everywhere, avx2 and avx512 on x86-64 with GCC or Clang (not MSVC, which takes no
# -m flags). src/dispatch.cc picks one at load.
# The variants are linked lowest first: where they share an inline function of the standard
# library, the linker keeps the first copy, so a copy that portable code calls is portable code.
# -Dst_isa_variants=0 builds the portable variant alone (scripts/build-native.mjs falls back to
# it when the compiler refuses the x86 flags).
{
  "variables": {
    "st_isa_variants%": 1,
    "st_kernels": ["src/addon.cc", "src/attention.cc", "src/bf16.cc", "src/conv.cc", "src/elementwise.cc", "src/half.cc", "src/layout.cc", "src/norm.cc", "src/optim.cc", "src/peak.cc"],
    "st_avx2_flags": ["-march=x86-64", "-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt", "-mmovbe", "-mpopcnt"],
    "st_avx512_flags": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512cd"]
  },
  "target_defaults": {
    "cflags_cc": ["-std=c++17", "-O3", "-pthread", "-fno-math-errno"],
    "cflags_cc!": ["-fno-exceptions", "-std=gnu++17", "-O2"],
    "xcode_settings": {
      "OTHER_CPLUSPLUSFLAGS": ["-std=c++17", "-O3"],
      "GCC_ENABLE_CPP_EXCEPTIONS": "YES"
    },
    "conditions": [
      ["target_arch=='x64'", {
        "cflags_cc": ["-march=x86-64"],
        "xcode_settings": { "OTHER_CPLUSPLUSFLAGS": ["-march=x86-64"] }
      }]
    ]
  },
  "targets": [
    {
      "target_name": "sidetrain_native",
      "sources": ["src/dispatch.cc", "src/pool.cc"],
      "dependencies": ["st_isa_portable"],
      "ldflags": ["-pthread"],
      "conditions": [
        ["target_arch=='x64' and OS!='win' and st_isa_variants==1", {
          "dependencies": ["st_isa_avx2", "st_isa_avx512"],
          "defines": ["ST_X86_VARIANTS=1"]
        }]
      ]
    },
    {
      "target_name": "st_isa_portable",
      "type": "static_library",
      "sources": ["<@(st_kernels)"],
      "defines": ["ST_ISA=isa_portable"]
    }
  ],
  "conditions": [
    ["target_arch=='x64' and OS!='win' and st_isa_variants==1", {
      "targets": [
        {
          "target_name": "st_isa_avx2",
          "type": "static_library",
          "sources": ["<@(st_kernels)"],
          "defines": ["ST_ISA=isa_avx2"],
          "cflags_cc": ["<@(st_avx2_flags)"],
          "xcode_settings": { "OTHER_CPLUSPLUSFLAGS": ["<@(st_avx2_flags)"] }
        },
        {
          "target_name": "st_isa_avx512",
          "type": "static_library",
          "sources": ["<@(st_kernels)"],
          "defines": ["ST_ISA=isa_avx512"],
          "cflags_cc": ["<@(st_avx2_flags)", "<@(st_avx512_flags)"],
          "xcode_settings": { "OTHER_CPLUSPLUSFLAGS": ["<@(st_avx2_flags)", "<@(st_avx512_flags)"] }
        }
      ]
    }]
  ]
}
