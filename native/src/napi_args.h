// One way for every binding to read its N-API arguments. A binding builds a NapiArgs, reads
// each argument by position with the check it needs, and tests ok() once before computing.
// The first failed read throws "fn: name: why" — a TypeError for a missing argument or a wrong
// type, a RangeError for a wrong length or value — and later reads return null / zero, so the
// error names the first bad argument and nothing runs on a half-read call.
#pragma once
#include <node_api.h>

#include <cstdint>
#include <string>
#include "variant.h"

ST_BEGIN_NAMESPACE

class NapiArgs {
 public:
  static constexpr size_t kMax = 16;

  NapiArgs(napi_env env, napi_callback_info info, const char* fn, size_t required = 0) : env_(env), fn_(fn) {
    if (napi_get_cb_info(env, info, &argc_, argv_, nullptr, nullptr) != napi_ok) argc_ = 0;
    if (argc_ > kMax) argc_ = kMax;
    if (argc_ < required) type_error("expected " + std::to_string(required) + " arguments, got " + std::to_string(argc_));
  }

  napi_env env() const { return env_; }
  bool ok() const { return !failed_; }
  size_t count() const { return argc_; }
  napi_value at(size_t i) const { return i < argc_ ? argv_[i] : nullptr; }

  void type_error(const std::string& why) { fail(why, false); }
  void range_error(const std::string& why) { fail(why, true); }

  // Argument i is given and not undefined.
  bool present(size_t i) const {
    napi_valuetype t = napi_undefined;
    return i < argc_ && napi_typeof(env_, argv_[i], &t) == napi_ok && t != napi_undefined;
  }

  // The element count of typed array i, 0 when it is not one (the typed read then says so).
  size_t length(size_t i) const {
    bool is = false;
    size_t len = 0;
    napi_typedarray_type type;
    if (i < argc_ && napi_is_typedarray(env_, argv_[i], &is) == napi_ok && is)
      napi_get_typedarray_info(env_, argv_[i], &type, &len, nullptr, nullptr, nullptr);
    return len;
  }

  // Typed array i of type `want` with at least minLen elements (exactly minLen when exact).
  template <class T>
  T* typed(size_t i, napi_typedarray_type want, size_t minLen, const char* name, bool exact = false) {
    if (failed_) return nullptr;
    bool is = false;
    napi_typedarray_type type;
    size_t len = 0;
    void* data = nullptr;
    if (i >= argc_ || napi_is_typedarray(env_, argv_[i], &is) != napi_ok || !is ||
        napi_get_typedarray_info(env_, argv_[i], &type, &len, &data, nullptr, nullptr) != napi_ok || type != want) {
      type_error(std::string(name) + ": expected " + type_name(want));
      return nullptr;
    }
    if (exact ? len != minLen : len < minLen) {
      range_error(std::string(name) + ": has " + std::to_string(len) + " elements, needs " + (exact ? "" : "at least ") +
                  std::to_string(minLen));
      return nullptr;
    }
    return static_cast<T*>(data);
  }
  float* f32(size_t i, size_t minLen, const char* name) { return typed<float>(i, napi_float32_array, minLen, name); }
  float* f32_exact(size_t i, size_t len, const char* name) { return typed<float>(i, napi_float32_array, len, name, true); }
  double* f64(size_t i, size_t minLen, const char* name) { return typed<double>(i, napi_float64_array, minLen, name); }
  int32_t* i32(size_t i, size_t minLen, const char* name) { return typed<int32_t>(i, napi_int32_array, minLen, name); }
  uint16_t* u16(size_t i, size_t minLen, const char* name) { return typed<uint16_t>(i, napi_uint16_array, minLen, name); }

  double number(size_t i, const char* name) {
    double v = 0;
    if (!failed_ && (i >= argc_ || napi_get_value_double(env_, argv_[i], &v) != napi_ok))
      type_error(std::string(name) + ": expected a number");
    return v;
  }
  long integer(size_t i, const char* name) { return static_cast<long>(number(i, name)); }

  bool boolean(size_t i, const char* name) {
    bool v = false;
    if (!failed_ && (i >= argc_ || napi_get_value_bool(env_, argv_[i], &v) != napi_ok))
      type_error(std::string(name) + ": expected a boolean");
    return v;
  }
  // Absent or undefined reads as `fallback`.
  bool optional_boolean(size_t i, const char* name, bool fallback = false) {
    return failed_ || !present(i) ? fallback : boolean(i, name);
  }

  // A string of at most maxLen bytes (longer ones are refused, not cut).
  std::string string(size_t i, const char* name, size_t maxLen = 64) {
    if (failed_) return "";
    size_t len = 0;
    if (i >= argc_ || napi_get_value_string_utf8(env_, argv_[i], nullptr, 0, &len) != napi_ok) {
      type_error(std::string(name) + ": expected a string");
      return "";
    }
    if (len > maxLen) {
      range_error(std::string(name) + ": longer than " + std::to_string(maxLen) + " bytes");
      return "";
    }
    std::string s(len + 1, '\0');
    napi_get_value_string_utf8(env_, argv_[i], &s[0], len + 1, &len);
    s.resize(len);
    return s;
  }

 private:
  napi_env env_;
  std::string fn_;
  napi_value argv_[kMax] = {};
  size_t argc_ = kMax;
  bool failed_ = false;

  void fail(const std::string& why, bool range) {
    if (failed_) return;
    failed_ = true;
    const std::string msg = fn_ + ": " + why;
    if (range)
      napi_throw_range_error(env_, nullptr, msg.c_str());
    else
      napi_throw_type_error(env_, nullptr, msg.c_str());
  }
  static const char* type_name(napi_typedarray_type t) {
    switch (t) {
      case napi_float32_array: return "a Float32Array";
      case napi_float64_array: return "a Float64Array";
      case napi_int32_array: return "an Int32Array";
      case napi_uint16_array: return "a Uint16Array";
      case napi_uint8_array: return "a Uint8Array";
      default: return "a typed array";
    }
  }
};

ST_END_NAMESPACE  // st::ST_ISA
