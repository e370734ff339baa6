#include "model/formats/pickle.h"

#include <cstring>
#include <map>

#include "core/error.h"

namespace rwkvx::pickle {
namespace {

constexpr size_t kMaxStack = 1 << 20;

class Unpickler {
 public:
  Unpickler(std::string_view d, const std::string& where) : d_(d), where_(where) {}

  Document run() {
    while (true) {
      if (pos_ >= d_.size()) fail("truncated pickle (no STOP opcode)");
      const size_t at = pos_;
      const uint8_t op = uint8_t(d_[pos_++]);
      switch (op) {
        case 0x80: take(1); break;                       // PROTO
        case 0x95: take(8); break;                       // FRAME (protocol 4)
        case '.': {                                      // STOP
          if (stack_.size() != 1 || !marks_.empty()) fail("pickle ends with a malformed stack");
          doc_.root = stack_.back();
          return std::move(doc_);
        }
        case '}': push(make(Value::Kind::dict)); break;  // EMPTY_DICT
        case ']': push(make(Value::Kind::list)); break;  // EMPTY_LIST
        case ')': push(make(Value::Kind::tuple)); break; // EMPTY_TUPLE
        case 'N': push(make(Value::Kind::none)); break;  // NONE
        case 0x88: push(boolean(true)); break;           // NEWTRUE
        case 0x89: push(boolean(false)); break;          // NEWFALSE
        case '(': marks_.push_back(stack_.size()); break;  // MARK
        case 'q': memo(u(1)); break;                     // BINPUT
        case 'r': memo(u(4)); break;                     // LONG_BINPUT
        case 0x94: memo(memo_.size()); break;            // MEMOIZE
        case 'h': push(get_memo(u(1))); break;           // BINGET
        case 'j': push(get_memo(u(4))); break;           // LONG_BINGET
        case 'K': push(integer(int64_t(u(1)))); break;   // BININT1
        case 'M': push(integer(int64_t(u(2)))); break;   // BININT2
        case 'J': push(integer(int64_t(int32_t(uint32_t(u(4)))))); break;  // BININT
        case 0x8a: {                                     // LONG1
          size_t n = u(1);
          if (n > 8) fail("LONG1 integer wider than 64 bits");
          std::string_view b = take(n);
          uint64_t v = 0;
          for (size_t k = n; k-- > 0;) v = v << 8 | uint8_t(b[k]);
          if (n > 0 && n < 8 && (uint8_t(b[n - 1]) & 0x80)) v |= ~uint64_t(0) << (8 * n);  // sign-extend
          push(integer(int64_t(v)));
          break;
        }
        case 'G': {                                      // BINFLOAT (big-endian double)
          std::string_view b = take(8);
          uint64_t v = 0;
          for (int k = 0; k < 8; ++k) v = v << 8 | uint8_t(b[k]);
          auto x = make(Value::Kind::floating);
          std::memcpy(&x->f, &v, 8);
          push(x);
          break;
        }
        case 'X': push(str(take(u(4)))); break;          // BINUNICODE
        case 0x8c: push(str(take(u(1)))); break;         // SHORT_BINUNICODE
        case 'U': push(str(take(u(1)))); break;          // SHORT_BINSTRING
        case 'T': push(str(take(u(4)))); break;          // BINSTRING
        case 't': {                                      // TUPLE
          auto t = make(Value::Kind::tuple);
          t->items = pop_mark();
          push(t);
          break;
        }
        case 0x85: case 0x86: case 0x87: {               // TUPLE1..3
          size_t n = op - 0x84;
          auto t = make(Value::Kind::tuple);
          need_stack(n, "TUPLEn");
          t->items.assign(stack_.end() - n, stack_.end());
          stack_.resize(stack_.size() - n);
          push(t);
          break;
        }
        case 'a': {                                      // APPEND
          ValuePtr v = pop();
          list_target()->items.push_back(v);
          break;
        }
        case 'e': {                                      // APPENDS
          auto items = pop_mark();
          auto l = list_target();
          l->items.insert(l->items.end(), items.begin(), items.end());
          break;
        }
        case 's': {                                      // SETITEM
          ValuePtr v = pop(), k = pop();
          dict_target()->entries.emplace_back(k, v);
          break;
        }
        case 'u': {                                      // SETITEMS
          auto items = pop_mark();
          if (items.size() % 2) fail("SETITEMS with an odd number of items");
          auto dct = dict_target();
          for (size_t k = 0; k < items.size(); k += 2) dct->entries.emplace_back(items[k], items[k + 1]);
          break;
        }
        case 'c': {                                      // GLOBAL "module\nname\n"
          std::string module = line(), name = line();
          push(global(module, name));
          break;
        }
        case 0x93: {                                     // STACK_GLOBAL
          ValuePtr name = pop(), module = pop();
          if (module->kind != Value::Kind::string || name->kind != Value::Kind::string)
            fail("STACK_GLOBAL operands are not strings");
          push(global(module->s, name->s));
          break;
        }
        case 'Q': {                                      // BINPERSID
          auto p = make(Value::Kind::persistent_id);
          p->pid = pop();
          push(p);
          break;
        }
        case 'R': {                                      // REDUCE: record the call, execute nothing
          ValuePtr args = pop(), fn = pop();
          if (fn->kind != Value::Kind::global) fail("REDUCE on something that is not an allowed global");
          if (args->kind != Value::Kind::tuple) fail("REDUCE arguments are not a tuple");
          auto c = make(Value::Kind::call);
          c->items = {fn, args};
          // OrderedDict() is the one call we can evaluate: an empty dict.
          if (fn->global == Global::ordered_dict) c = make(Value::Kind::dict);
          push(c);
          break;
        }
        case 'b': {                                      // BUILD: only state set on an OrderedDict (its _metadata)
          pop();
          need_stack(1, "BUILD");
          if (stack_.back()->kind != Value::Kind::dict) fail("BUILD on an object other than a dict");
          break;
        }
        default: {
          char buf[64];
          std::snprintf(buf, sizeof buf, "forbidden pickle opcode 0x%02x at byte %zu", op, at);
          fail(buf);
        }
      }
      if (stack_.size() > kMaxStack) fail("pickle stack too deep");
    }
  }

 private:
  [[noreturn]] void fail(const std::string& msg) const { throw Error(where_ + ": data.pkl: " + msg); }

  std::string_view take(size_t n) {
    if (n > d_.size() - pos_) fail("truncated pickle");
    std::string_view v = d_.substr(pos_, n);
    pos_ += n;
    return v;
  }
  uint64_t u(size_t n) {
    std::string_view b = take(n);
    uint64_t v = 0;
    for (size_t k = n; k-- > 0;) v = v << 8 | uint8_t(b[k]);
    return v;
  }
  std::string line() {
    size_t e = d_.find('\n', pos_);
    if (e == std::string_view::npos) fail("truncated GLOBAL");
    std::string s(d_.substr(pos_, e - pos_));
    pos_ = e + 1;
    return s;
  }
  ValuePtr make(Value::Kind k) {
    if (doc_.arena.size() > kMaxStack * 4) fail("too many objects");
    doc_.arena.push_back(std::make_unique<Value>());
    ValuePtr v = doc_.arena.back().get();
    v->kind = k;
    return v;
  }
  ValuePtr boolean(bool b) {
    auto v = make(Value::Kind::boolean);
    v->i = b;
    return v;
  }
  ValuePtr integer(int64_t i) {
    auto v = make(Value::Kind::integer);
    v->i = i;
    return v;
  }
  ValuePtr str(std::string_view s) {
    auto v = make(Value::Kind::string);
    v->s = std::string(s);
    return v;
  }
  ValuePtr global(const std::string& module, const std::string& name) {
    static const std::map<std::string, Global> allowed = {
        {"torch._utils._rebuild_tensor_v2", Global::rebuild_tensor_v2},
        {"torch._utils._rebuild_parameter", Global::rebuild_parameter},
        {"collections.OrderedDict", Global::ordered_dict},
        {"torch.FloatStorage", Global::float_storage},
        {"torch.HalfStorage", Global::half_storage},
        {"torch.BFloat16Storage", Global::bfloat16_storage},
    };
    auto it = allowed.find(module + "." + name);
    if (it == allowed.end()) fail("forbidden global '" + module + "." + name + "' (only tensor rebuilding is allowed)");
    auto v = make(Value::Kind::global);
    v->global = it->second;
    v->s = module + "." + name;
    return v;
  }
  void push(ValuePtr v) { stack_.push_back(std::move(v)); }
  void need_stack(size_t n, const char* what) {
    size_t floor = marks_.empty() ? 0 : marks_.back();
    if (stack_.size() < floor + n) fail(std::string("stack underflow at ") + what);
  }
  ValuePtr pop() {
    need_stack(1, "pop");
    ValuePtr v = stack_.back();
    stack_.pop_back();
    return v;
  }
  std::vector<ValuePtr> pop_mark() {
    if (marks_.empty()) fail("opcode needs a MARK but none is set");
    size_t m = marks_.back();
    marks_.pop_back();
    std::vector<ValuePtr> items(stack_.begin() + long(m), stack_.end());
    stack_.resize(m);
    return items;
  }
  ValuePtr list_target() {
    need_stack(1, "APPEND");
    if (stack_.back()->kind != Value::Kind::list) fail("APPEND to a non-list");
    return stack_.back();
  }
  ValuePtr dict_target() {
    need_stack(1, "SETITEM");
    if (stack_.back()->kind != Value::Kind::dict) fail("SETITEM on a non-dict");
    return stack_.back();
  }
  void memo(uint64_t key) {
    if (stack_.empty()) fail("PUT on an empty stack");
    if (memo_.size() > kMaxStack) fail("too many memo entries");
    memo_[key] = stack_.back();
  }
  ValuePtr get_memo(uint64_t key) {
    auto it = memo_.find(key);
    if (it == memo_.end()) fail("GET of unknown memo key " + std::to_string(key));
    return it->second;
  }

  std::string_view d_;
  const std::string& where_;
  size_t pos_ = 0;
  std::vector<ValuePtr> stack_;
  std::vector<size_t> marks_;
  std::map<uint64_t, ValuePtr> memo_;
  Document doc_;
};

}  // namespace

Document unpickle(std::string_view data, const std::string& where) { return Unpickler(data, where).run(); }

}  // namespace rwkvx::pickle
