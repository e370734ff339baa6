// A 5 × 7 pixel bitmap font for plot labels (drawn by eval/plot's draw_text): digits, capital letters and
// common punctuation; lower-case letters are drawn as capitals, and any other character as a hollow box.
#pragma once
#include <array>
#include <cstdint>

namespace rwkvx {

inline constexpr int kGlyphWidth = 5, kGlyphHeight = 7;

// Row bits of `c`, top row first; bit 4 is the leftmost pixel. Unknown characters give the hollow box.
const std::array<uint8_t, kGlyphHeight>& glyph_rows(unsigned char c);

}  // namespace rwkvx
