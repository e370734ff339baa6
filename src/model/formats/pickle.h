// Restricted unpickler for PyTorch's data.pkl. It interprets only the opcodes a tensor state dict uses
// and accepts only the globals needed to rebuild tensors; it never calls or imports anything, so a
// malicious checkpoint cannot execute code. Anything else is an error naming the opcode or global.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace rwkvx::pickle {

struct Value;
// Values live in the Document's arena, so references (memo GETs, even cycles) are plain pointers.
using ValuePtr = Value*;

// The globals we accept. Each is inert data here; pth.cpp gives them meaning.
enum class Global { rebuild_tensor_v2, rebuild_parameter, ordered_dict, float_storage, half_storage,
                    bfloat16_storage };

struct Value {
  enum class Kind { none, boolean, integer, floating, string, tuple, list, dict, global, call, persistent_id };
  Kind kind = Kind::none;
  int64_t i = 0;  // boolean / integer
  double f = 0;
  std::string s;  // string
  Global global{};
  std::vector<ValuePtr> items;                         // tuple / list; call: items[0] = callee, items[1] = args
  std::vector<std::pair<ValuePtr, ValuePtr>> entries;  // dict (ordered as written)
  ValuePtr pid;                                        // persistent_id: the id object (a tuple)
};

struct Document {
  std::vector<std::unique_ptr<Value>> arena;
  ValuePtr root = nullptr;
};

// Unpickles `data`; `where` names the file for errors. Calls (REDUCE of an accepted global) are left
// as Kind::call nodes for the caller to interpret.
Document unpickle(std::string_view data, const std::string& where);

}  // namespace rwkvx::pickle
