// Registration hooks for the rwkvx CLI subcommands: main.cpp calls one register_*_commands per
// tools/cli/cmd_*.cpp file, each of which adds its subcommands (with descriptions and callbacks) to the app.
#pragma once

namespace CLI {
class App;
}

// tokenize / detokenize (cmd_tokenize.cpp, spec §1).
void register_tokenize_commands(CLI::App& app);

// logits / info (cmd_model.cpp).
void register_model_commands(CLI::App& app);

// init (cmd_init.cpp).
void register_init_commands(CLI::App& app);

// generate (cmd_generate.cpp), chat (cmd_chat.cpp), serve (cmd_serve.cpp).
void register_generate_commands(CLI::App& app);
void register_chat_commands(CLI::App& app);
void register_serve_commands(CLI::App& app);

// bench (cmd_bench.cpp), quality (cmd_quality.cpp), prefill (cmd_prefill.cpp).
void register_bench_commands(CLI::App& app);
void register_quality_commands(CLI::App& app);
void register_prefill_commands(CLI::App& app);

// expand, data (cmd_train_data.cpp).
void register_train_data_commands(CLI::App& app);

// train (cmd_train.cpp).
void register_train_commands(CLI::App& app);
// eval passkey / loss / tasks (cmd_eval.cpp, spec system.md §5).
void register_eval_commands(CLI::App& app);
