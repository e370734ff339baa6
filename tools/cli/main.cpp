// rwkvx: one binary, one subcommand per job. Each cmd_*.cpp registers its subcommands; errors from the
// engine (rwkvx::Error) are printed as one line "error: ..." with exit status 1.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"rwkvx: RWKV-X and RWKV-7 language models on CPU (and CUDA), exact to the reference"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("rwkvx ") + RWKVX_VERSION);
  register_model_commands(app);
  register_tokenize_commands(app);
  register_init_commands(app);
  register_bench_commands(app);
  register_quality_commands(app);
  register_prefill_commands(app);
  register_generate_commands(app);
  register_chat_commands(app);
  register_serve_commands(app);
  register_train_data_commands(app);
  register_train_commands(app);
  register_eval_commands(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const rwkvx::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
    return 1;
  }
  return 0;
}
