{
  "targets": [
    {
      "target_name": "sidetrain_native",
      "sources": ["src/addon.cc", "src/attention.cc", "src/bf16.cc", "src/conv.cc", "src/elementwise.cc", "src/half.cc", "src/layout.cc", "src/norm.cc", "src/optim.cc", "src/peak.cc", "src/pool.cc"],
      "cflags_cc": ["-std=c++17", "-O3", "-march=<(native_arch)", "-pthread", "-fno-math-errno"],
      "cflags_cc!": ["-fno-exceptions", "-std=gnu++17", "-O2"],
      "ldflags": ["-pthread"],
      "xcode_settings": {
        "OTHER_CPLUSPLUSFLAGS": ["-std=c++17", "-O3", "-march=<(native_arch)"],
        "GCC_ENABLE_CPP_EXCEPTIONS": "YES"
      }
    }
  ],
  "variables": { "native_arch%": "native" }
}
