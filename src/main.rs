//! The `spidergate` binary: serve, check-config, keys, usage, traces.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The gateway allocates small, short-lived objects on many threads (and frees some on the
/// ledger thread); mimalloc handles that pattern much better than glibc malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use spidergate::audit::Actor;
use spidergate::catalog::Catalog;
use spidergate::clock::{month_index, month_label, now_ms, parse_month, rfc3339};
use spidergate::config::{resolve_path, Config};
use spidergate::keys::{split_list, KeyRecord};
use spidergate::limits::ModelTally;
use spidergate::manage::{
    self, GroupChanges, GroupSpec, KeyChanges, KeyError, KeyService, KeySpec,
};
use spidergate::money::Nanos;
use spidergate::report;
use spidergate::store::Store;

#[derive(Parser)]
#[command(
    name = "spidergate",
    version,
    about = "OpenAI-compatible LLM gateway for fleets of AI agents"
)]
struct Cli {
    /// Config file [default: $SPIDERGATE_CONFIG, else conf/spidergate.yaml]
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the gateway (Pingora's -d/--daemon, -u/--upgrade and -t/--test flags apply)
    Serve(ServeArgs),
    /// Validate the config file; errors name the field path
    CheckConfig,
    /// Manage agent keys
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Groups of keys: one budget and rpm over many keys
    #[command(subcommand)]
    Groups(GroupsCommand),
    /// Month-to-date spend per key and model
    Usage {
        /// One key; all keys when omitted
        id: Option<String>,
        /// Month as YYYY-MM [default: the current UTC month]
        #[arg(long)]
        month: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Recent request traces, newest first
    Traces {
        #[arg(long)]
        key: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Model prices and limits from a price catalog
    #[command(subcommand)]
    Prices(PricesCommand),
    /// Who changed what through which door, newest first
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PricesCommand {
    /// Fill prices, context windows and max output tokens of the configured models from a
    /// LiteLLM-format price map (model_prices_and_context_window.json), in the config file
    Import {
        /// The price map (JSON)
        file: PathBuf,
        /// Print the diff and change nothing
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    pingora: pingora_core::server::configuration::Opt,
}

#[derive(Args, Default)]
struct LimitArgs {
    /// Requests per rolling minute ("none" = unlimited)
    #[arg(long)]
    rpm: Option<String>,
    /// Requests per UTC day ("none" = unlimited)
    #[arg(long)]
    rpd: Option<String>,
    /// Monthly budget in USD ("none" = unlimited)
    #[arg(long)]
    budget: Option<String>,
    #[arg(long, value_parser = ["soft", "hard"])]
    budget_mode: Option<String>,
    /// Allow-list of models and aliases, comma-separated (empty = all)
    #[arg(long)]
    models: Option<String>,
    /// Scopes, comma-separated [default: gate:chat,gate:models,gate:usage]
    #[arg(long)]
    scopes: Option<String>,
    /// Lifetime from now, 1h..90d [default on create: 30d]
    #[arg(long)]
    ttl: Option<String>,
    /// The agent's own label, shown with its traces ("none" or "" on update = clear it)
    #[arg(long)]
    client_id: Option<String>,
    /// Requests in flight at once ("none" = unlimited); one over gets 429
    #[arg(long)]
    max_inflight: Option<String>,
    /// Spend cap in USD over any rolling 60 minutes, reservations included ("none" = no cap);
    /// over it: 429 spend_rate_exceeded
    #[arg(long)]
    max_usd_per_hour: Option<String>,
    /// The same request (endpoint, model, body) at most N times per rolling 60 s ("none" = no
    /// limit); one more: 429 loop_detected
    #[arg(long)]
    loop_limit: Option<String>,
    /// The group whose budget and rpm the key also counts against ("none" = leave it)
    #[arg(long)]
    group: Option<String>,
}

#[derive(Args, Default)]
struct GroupLimitArgs {
    /// Monthly budget in USD over the sum of the group's keys ("none" = unlimited)
    #[arg(long)]
    budget: Option<String>,
    #[arg(long, value_parser = ["soft", "hard"])]
    budget_mode: Option<String>,
    /// Requests per rolling minute over the sum of the group's keys ("none" = unlimited)
    #[arg(long)]
    rpm: Option<String>,
}

#[derive(Subcommand)]
enum GroupsCommand {
    /// A group of keys with one monthly budget and rpm over their sum
    Create {
        name: String,
        #[command(flatten)]
        limits: GroupLimitArgs,
        #[arg(long)]
        json: bool,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    /// A group's limits, this month's spend per model and its keys
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Change limits; takes effect in the running gateway within 1 s
    Update {
        name: String,
        #[command(flatten)]
        limits: GroupLimitArgs,
        #[arg(long)]
        json: bool,
    },
    /// Delete a group; its keys stay, outside any group
    Delete {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Mint a key; the secret is printed once
    Create {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
        /// Only models marked free in the config
        #[arg(long)]
        free_only: bool,
        #[arg(long)]
        json: bool,
    },
    /// List keys (active only unless --all)
    List {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Change limits; takes effect in the running gateway within 1 s
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
        /// Only models marked free: `--free-only` (as on `create`) or `--free-only true`;
        /// `--free-only false` lifts it
        #[arg(long, num_args = 0..=1, default_missing_value = "true")]
        free_only: Option<bool>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key immediately
    Revoke {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Issue a new secret for the same key; the old one works until the grace ends
    Rotate {
        id: String,
        /// How long the old secret keeps working, 0s..7d
        #[arg(long, default_value = manage::DEFAULT_GRACE)]
        grace: String,
        #[arg(long)]
        json: bool,
    },
}

type CliResult = Result<(), String>;

/// `keys update`'s `--free-only` takes an optional value (`true`/`false`), and clap, seeing
/// a value slot, would read whatever follows as that value: `keys update --free-only ID`
/// would fail on the id. Here a bare `--free-only` there (last, or followed by anything but
/// `true`/`false`) becomes `--free-only=true`, so the switch works in any position, as on
/// `create`.
fn bare_free_only(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let Some(at) = args
        .windows(2)
        .position(|w| w[0] == "keys" && w[1] == "update")
    else {
        return args;
    };
    for i in at + 2..args.len() {
        if args[i] == "--" {
            break;
        }
        let valued = args.get(i + 1).is_some_and(|v| v == "true" || v == "false");
        if args[i] == "--free-only" && !valued {
            args[i] = "--free-only=true".into();
        }
    }
    args
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`): the human format, or with
/// `SPIDERGATE_LOG_FORMAT=json` one JSON object per line for journald and log shippers:
/// `{"ts":"2026-11-27T06:07:15.123Z","level":"INFO","target":"spidergate::serve","msg":"..."}`
/// (RFC 3339 UTC, serialized by serde_json, so any message is escaped properly).
fn init_logger() {
    #[derive(serde::Serialize)]
    struct JsonLine<'a> {
        ts: String,
        level: &'a str,
        target: &'a str,
        msg: String,
    }
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    let format = std::env::var("SPIDERGATE_LOG_FORMAT").unwrap_or_default();
    let json = format.eq_ignore_ascii_case("json");
    if json {
        builder.format(|buf, record| {
            use std::io::Write;
            let line = JsonLine {
                ts: buf.timestamp_millis().to_string(),
                level: record.level().as_str(),
                target: record.target(),
                msg: record.args().to_string(),
            };
            // env_logger buffers the record and writes it to stderr in one go.
            serde_json::to_writer(&mut *buf, &line)?;
            writeln!(buf)
        });
    }
    let logger = WireQuiet(builder.build());
    log::set_max_level(logger.0.filter());
    if log::set_boxed_logger(Box::new(logger)).is_err() {
        eprintln!("a logger was installed already");
    }
    if !json && !format.is_empty() && !format.eq_ignore_ascii_case("text") {
        log::warn!("SPIDERGATE_LOG_FORMAT={format:?} is neither \"json\" nor \"text\"; using text");
    }
}

/// Log targets that dump raw HTTP traffic at debug and trace: whole request heads (the
/// agent's bearer token, the provider key) and bodies. They stay at info whatever `RUST_LOG`
/// says, so no log level shows a secret (SPEC §1; tests/gateway.rs runs at `trace`).
const WIRE_TARGETS: [&str; 3] = ["pingora_proxy", "pingora_core::protocols", "h2"];

/// `env_logger` with [`WIRE_TARGETS`] capped at info. At the default level the `log` macros
/// stop at the max level before reaching it: nothing is added to a request's path.
struct WireQuiet(env_logger::Logger);

impl WireQuiet {
    fn wire_detail(meta: &log::Metadata<'_>) -> bool {
        meta.level() > log::Level::Info
            && WIRE_TARGETS.iter().any(|t| {
                meta.target()
                    .strip_prefix(t)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
            })
    }
}

impl log::Log for WireQuiet {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        !Self::wire_detail(meta) && self.0.enabled(meta)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !Self::wire_detail(record.metadata()) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

fn main() -> ExitCode {
    spidergate::memory::no_huge_pages();
    // Before any command opens the database.
    if !spidergate::memory::sqlite_on_mimalloc() {
        eprintln!("spidergate: SQLite keeps glibc malloc (it initialized first)");
    }
    init_logger();
    let cli = Cli::parse_from(bare_free_only(std::env::args_os().collect()));
    if !matches!(cli.command, Command::Serve(_)) {
        restore_sigpipe();
    }
    let config_path = resolve_path(cli.config.as_deref());
    let result = match cli.command {
        // Exactly what `serve` and SIGHUP check: the config, then the routes built from it.
        Command::CheckConfig => Config::load(&config_path)
            .map_err(|e| e.to_string())
            .and_then(|mut c| {
                c.load_provider_keys();
                let now = spidergate::clock::now_ms() / 1000;
                let listeners = spidergate::listen_tls::check(&c, now)?;
                spidergate::snapshot::Routes::build(c).map(|r| {
                    for w in r.warnings.iter().chain(&listeners) {
                        eprintln!("warning: {w}");
                    }
                    r.config
                })
            })
            .map(|c| {
                println!(
                    "{}: ok ({} providers, {} models, {} aliases)",
                    config_path.display(),
                    c.providers.len(),
                    c.models.len(),
                    c.aliases.len()
                );
            })
            .map_err(|e| e.to_string()),
        Command::Prices(PricesCommand::Import {
            file,
            dry_run,
            json,
        }) => prices_import(&config_path, &file, dry_run, json),
        Command::Serve(args) => Config::load(&config_path)
            .map_err(|e| e.to_string())
            .and_then(|c| spidergate::serve::run(c, args.pingora)),
        // A revocation needs only the store: a config that does not load whole (a typo
        // made while the gateway runs on the last good one) must not keep it from happening.
        Command::Keys(KeysCommand::Revoke { id, json }) => match Config::load(&config_path) {
            Ok(c) => manage_command(c, Command::Keys(KeysCommand::Revoke { id, json })),
            Err(e) => revoke_with_store_only(&config_path, &e.to_string(), &id, json),
        },
        command => Config::load(&config_path)
            .map_err(|e| e.to_string())
            .and_then(|c| manage_command(c, command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn open(config: &Config) -> Result<Store, String> {
    open_at(config.store_location())
}

fn open_at(at: spidergate::store::StoreLocation) -> Result<Store, String> {
    // A relative `database` is read from the directory the command runs in: run from another
    // one, the CLI would quietly make and use a new, empty store the gateway never reads.
    if let spidergate::store::StoreLocation::Sqlite(p) = &at {
        if p.is_relative() && !p.exists() {
            let cwd = std::env::current_dir().unwrap_or_default();
            eprintln!(
                "warning: no database at {} yet; a new one is made there (the config's \
                 relative `database` is read from the directory the command runs in; run it \
                 from the gateway's directory, or give `database` an absolute path)",
                cwd.join(p).display()
            );
        }
    }
    Store::open_at(&at).map_err(|e| match at {
        spidergate::store::StoreLocation::Sqlite(p) => format!("database {}: {e}", p.display()),
        // The URL may carry a password: not printed.
        spidergate::store::StoreLocation::Postgres(_) => format!("database (PostgreSQL): {e}"),
    })
}

/// `keys revoke` when the config does not load: the store it names is found from its
/// `database` (or `shared_state.postgres_url_env`) alone, and the key revoked there, with
/// a warning that names the config's error. The running gateway sees the revocation as any
/// other (it polls the store's changes).
fn revoke_with_store_only(config_path: &Path, load_error: &str, id: &str, json: bool) -> CliResult {
    let at = Config::store_location_only(config_path)
        .map_err(|e| format!("{load_error} (and no store could be read from it: {e})"))?;
    let place = match &at {
        spidergate::store::StoreLocation::Sqlite(p) => format!("database {}", p.display()),
        spidergate::store::StoreLocation::Postgres(_) => "PostgreSQL".to_string(),
    };
    eprintln!("warning: {load_error}; revoking in {place}, named by the same file");
    let mut store = open_at(at)?;
    let now = now_ms();
    let k = KeyService::new(&mut store, &Catalog::empty(), Actor::cli())
        .revoke(id, now)
        .map_err(cli_err)?;
    await_running_gateways(&store);
    print_revoked(&k, now, json);
    Ok(())
}

/// Longest wait of a CLI change for the gateways running on its store.
const GATEWAY_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Waits until every gateway running on this store (SQLite: processes on this machine) has
/// applied the change just committed, so that a key revoked, rotated or narrowed from the
/// CLI is refused from the moment the command returns (SPEC §1: revocation is immediate), as
/// through the admin API. A gateway takes changes at its next poll (`reload_interval_ms`,
/// 250 ms by default); one that has not within [`GATEWAY_SYNC_WAIT`] is named in a warning
/// and takes it at a later poll. PostgreSQL's nodes are not waited for.
fn await_running_gateways(store: &Store) {
    let Ok(target) = store.last_key_change() else {
        return;
    };
    let deadline = std::time::Instant::now() + GATEWAY_SYNC_WAIT;
    loop {
        let Ok(rows) = store.keys_applied() else {
            return;
        };
        let behind: Vec<i64> = rows
            .into_iter()
            .filter(|&(owner, seq)| seq < target && spidergate::owner::is_live(owner))
            .map(|(owner, _)| spidergate::owner::pid_of(owner))
            .collect();
        if behind.is_empty() {
            return;
        }
        if std::time::Instant::now() >= deadline {
            eprintln!(
                "warning: the gateway running as pid {behind:?} has not applied the change yet; \
                 it takes it at its next poll of the store"
            );
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn print_revoked(k: &KeyRecord, now: i64, json: bool) {
    if json {
        print_json(&report::key_json(k, now));
    } else {
        println!(
            "Revoked key {} ({}) at {}",
            k.id,
            k.name,
            rfc3339(k.revoked_at.unwrap_or(now))
        );
    }
}

/// A key looked up by id, or the CLI's "no key" error.
fn found(
    id: &str,
    looked_up: Result<Option<KeyRecord>, spidergate::store::StoreError>,
) -> Result<KeyRecord, String> {
    looked_up
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no key with id \"{id}\""))
}

/// A CLI command whose reader went away (`spidergate keys list --json | head`) ends quietly,
/// as other Unix tools do, instead of panicking in `println!`: Rust ignores SIGPIPE, so
/// every write would fail with `EPIPE` instead. The server keeps it ignored (a client that
/// hangs up must not end it).
fn restore_sigpipe() {
    // SAFETY: setting a signal's disposition to its default, before any other thread runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// `Some(None)` for "none"/"unlimited", `Some(Some(n))` for a number; the key service
/// judges the number.
fn parse_limit(field: &'static str, v: Option<&str>) -> Result<Option<Option<i64>>, KeyError> {
    match v {
        None => Ok(None),
        Some("none" | "unlimited") => Ok(Some(None)),
        Some(s) => s.trim().parse::<i64>().map(|n| Some(Some(n))).map_err(|_| {
            KeyError::invalid(
                field,
                format!("{field} must be a whole number or \"none\", got \"{s}\""),
            )
        }),
    }
}

fn parse_budget(v: Option<&str>) -> Result<Option<Option<f64>>, KeyError> {
    parse_usd(v, "monthly_budget_usd", "--budget must be a USD amount")
}

fn parse_usd_per_hour(v: Option<&str>) -> Result<Option<Option<f64>>, KeyError> {
    parse_usd(
        v,
        "max_usd_per_hour",
        "--max-usd-per-hour must be a USD amount or \"none\"",
    )
}

/// A USD flag: absent (`None`), `none`/`unlimited` (`Some(None)`), or an amount, with an
/// optional leading `$`. `expected` opens the message naming the flag.
fn parse_usd(
    v: Option<&str>,
    field: &'static str,
    expected: &str,
) -> Result<Option<Option<f64>>, KeyError> {
    match v {
        None => Ok(None),
        Some("none" | "unlimited") => Ok(Some(None)),
        Some(s) => s
            .trim_start_matches('$')
            .parse()
            .map(|usd| Some(Some(usd)))
            .map_err(|_| KeyError::invalid(field, format!("{expected}, got \"{s}\""))),
    }
}

/// A key-service refusal as a CLI error, naming the flag.
fn cli_err(e: KeyError) -> String {
    match e.field() {
        Some(field) => {
            let flag = match field {
                "monthly_budget_usd" => "budget",
                "allowed_models" => "models",
                other => other,
            };
            format!("--{}: {e}", flag.replace('_', "-"))
        }
        None => e.to_string(),
    }
}

fn group_limits(l: GroupLimitArgs) -> Result<GroupChanges, String> {
    Ok(GroupChanges {
        budget_usd: parse_budget(l.budget.as_deref()).map_err(cli_err)?,
        budget_mode: l.budget_mode,
        rpm: parse_limit("rpm", l.rpm.as_deref()).map_err(cli_err)?,
    })
}

/// `spidergate groups ...`: through the key service, like `keys`.
fn groups_command(
    store: &mut spidergate::store::Store,
    catalog: &Catalog,
    cmd: GroupsCommand,
    now: i64,
) -> CliResult {
    let month = month_index(now);
    let show = |store: &spidergate::store::Store, g: &spidergate::store::GroupRecord| {
        let spend = store
            .group_spend(&g.name, &month_label(month))
            .map_err(|e| e.to_string())?;
        let keys = store.group_members(&g.name).map_err(|e| e.to_string())?;
        let tallies: Vec<_> = spend.into_iter().map(ModelTally::from).collect();
        Ok::<_, String>(report::group_json(g, month, &tallies, Nanos::ZERO, &keys))
    };
    let mut service = KeyService::new(store, catalog, Actor::cli());
    let (v, human) = match cmd {
        GroupsCommand::Create { name, limits, json } => {
            let l = group_limits(limits)?;
            let spec = GroupSpec {
                name,
                budget_usd: l.budget_usd.flatten(),
                budget_mode: l.budget_mode,
                rpm: l.rpm.flatten(),
            };
            let g = service.create_group(spec, now).map_err(cli_err)?;
            (report::group_json(&g, month, &[], Nanos::ZERO, &[]), !json)
        }
        GroupsCommand::List { json } => {
            let groups = service.list_groups().map_err(cli_err)?;
            drop(service);
            let list = groups
                .iter()
                .map(|g| show(store, g))
                .collect::<Result<Vec<_>, _>>()?;
            (json!(list), !json)
        }
        GroupsCommand::Show { name, json } => {
            let g = service.get_group(&name).map_err(cli_err)?;
            drop(service);
            (show(store, &g)?, !json)
        }
        GroupsCommand::Update { name, limits, json } => {
            let g = service
                .update_group(&name, group_limits(limits)?, now)
                .map_err(cli_err)?;
            drop(service);
            (show(store, &g)?, !json)
        }
        GroupsCommand::Delete { name, json } => {
            service.delete_group(&name, now).map_err(cli_err)?;
            (json!({"name": name, "deleted": true}), !json)
        }
    };
    if human {
        match v.as_array() {
            Some(list) => list.iter().for_each(|g| {
                print_human(g);
                println!();
            }),
            None => print_human(&v),
        }
    } else {
        print_json(&v);
    }
    Ok(())
}

fn manage_command(config: Config, command: Command) -> CliResult {
    let catalog = Catalog::new(&config);
    let mut store = open(&config)?;
    let now = now_ms();
    match command {
        Command::Keys(KeysCommand::Create {
            name,
            limits,
            free_only,
            json,
        }) => {
            let spec = KeySpec {
                name,
                rpm: parse_limit("rpm", limits.rpm.as_deref())
                    .map_err(cli_err)?
                    .flatten(),
                rpd: parse_limit("rpd", limits.rpd.as_deref())
                    .map_err(cli_err)?
                    .flatten(),
                max_inflight: parse_limit("max_inflight", limits.max_inflight.as_deref())
                    .map_err(cli_err)?
                    .flatten(),
                budget_usd: parse_budget(limits.budget.as_deref())
                    .map_err(cli_err)?
                    .flatten(),
                budget_mode: limits.budget_mode,
                allowed_models: limits.models.as_deref().map(split_list).unwrap_or_default(),
                free_only,
                scopes: limits.scopes.as_deref().map(split_list),
                ttl: limits.ttl,
                client_id: limits.client_id,
                group: limits.group,
                max_usd_per_hour: parse_usd_per_hour(limits.max_usd_per_hour.as_deref())
                    .map_err(cli_err)?
                    .flatten(),
                loop_limit: parse_limit("loop_limit", limits.loop_limit.as_deref())
                    .map_err(cli_err)?
                    .flatten(),
            };
            let (record, secret) = KeyService::new(&mut store, &catalog, Actor::cli())
                .create(spec, now)
                .map_err(cli_err)?;
            if json {
                let mut v = report::key_json(&record, now);
                v["secret"] = json!(secret);
                print_json(&v);
            } else {
                println!("Created key {} ({})", record.id, record.name);
                println!("Secret (shown once, store it now): {secret}");
                println!("Expires: {}", rfc3339(record.expires_at));
            }
            Ok(())
        }
        Command::Keys(KeysCommand::List { all, json }) => {
            let keys: Vec<KeyRecord> = KeyService::new(&mut store, &catalog, Actor::cli())
                .list(all, now)
                .map_err(cli_err)?;
            if json {
                print_json(&json!(keys
                    .iter()
                    .map(|k| report::key_json(k, now))
                    .collect::<Vec<_>>()));
            } else {
                println!(
                    "{:<22} {:<20} {:<8} {:<8} {:>6} {:>8} {:>12}  EXPIRES",
                    "ID", "NAME", "PREFIX", "STATUS", "RPM", "RPD", "BUDGET"
                );
                for k in &keys {
                    let limit = |v: Option<u32>| v.map_or("-".to_string(), |n| n.to_string());
                    let budget = k.budget.map_or("-".to_string(), |n| {
                        format!("${n} {}", k.budget_mode.as_str())
                    });
                    println!(
                        "{:<22} {:<20} {:<8} {:<8} {:>6} {:>8} {:>12}  {}",
                        k.id,
                        k.name,
                        k.prefix,
                        k.status(now),
                        limit(k.rpm),
                        limit(k.rpd),
                        budget,
                        rfc3339(k.expires_at)
                    );
                }
            }
            Ok(())
        }
        Command::Keys(KeysCommand::Show { id, json }) => {
            let k = found(&id, store.get_key(&id))?;
            let v = report::key_json(&k, now);
            if json {
                print_json(&v);
            } else {
                print_human(&v);
            }
            Ok(())
        }
        Command::Keys(KeysCommand::Update {
            id,
            name,
            limits,
            free_only,
            json,
        }) => {
            let changes = KeyChanges {
                name,
                scopes: limits.scopes.as_deref().map(split_list),
                rpm: parse_limit("rpm", limits.rpm.as_deref()).map_err(cli_err)?,
                rpd: parse_limit("rpd", limits.rpd.as_deref()).map_err(cli_err)?,
                max_inflight: parse_limit("max_inflight", limits.max_inflight.as_deref())
                    .map_err(cli_err)?,
                budget_usd: parse_budget(limits.budget.as_deref()).map_err(cli_err)?,
                budget_mode: limits.budget_mode,
                allowed_models: limits.models.as_deref().map(split_list),
                free_only,
                ttl: limits.ttl,
                // "none" clears it, as for every other field here (an empty one does too).
                client_id: limits
                    .client_id
                    .map(|c| (c != "none" && !c.is_empty()).then_some(c)),
                group: limits
                    .group
                    .map(|g| (g != "none" && !g.is_empty()).then_some(g)),
                max_usd_per_hour: parse_usd_per_hour(limits.max_usd_per_hour.as_deref())
                    .map_err(cli_err)?,
                loop_limit: parse_limit("loop_limit", limits.loop_limit.as_deref())
                    .map_err(cli_err)?,
            };
            let k = KeyService::new(&mut store, &catalog, Actor::cli())
                .update(&id, changes, now)
                .map_err(cli_err)?;
            await_running_gateways(&store);
            let v = report::key_json(&k, now);
            if json {
                print_json(&v);
            } else {
                println!("Updated key {}", k.id);
                print_human(&v);
            }
            Ok(())
        }
        Command::Keys(KeysCommand::Rotate { id, grace, json }) => {
            let (k, secret) = KeyService::new(&mut store, &catalog, Actor::cli())
                .rotate(&id, Some(&grace), now)
                .map_err(cli_err)?;
            await_running_gateways(&store);
            if json {
                let mut v = report::key_json(&k, now);
                v["secret"] = json!(secret);
                print_json(&v);
            } else {
                println!("Rotated key {} ({})", k.id, k.name);
                println!("New secret (shown once, store it now): {secret}");
                if let Some(until) = k.previous_valid_until {
                    println!("The previous secret works until {}", rfc3339(until));
                }
            }
            Ok(())
        }
        Command::Keys(KeysCommand::Revoke { id, json }) => {
            let k = KeyService::new(&mut store, &catalog, Actor::cli())
                .revoke(&id, now)
                .map_err(cli_err)?;
            await_running_gateways(&store);
            print_revoked(&k, now, json);
            Ok(())
        }
        Command::Groups(cmd) => groups_command(&mut store, &catalog, cmd, now),
        Command::Usage { id, month, json } => {
            let month = match month.as_deref() {
                Some(m) => {
                    parse_month(m).ok_or_else(|| format!("--month must be YYYY-MM, got \"{m}\""))?
                }
                None => month_index(now),
            };
            let keys = match &id {
                Some(id) => vec![found(id, store.get_key(id))?],
                None => store.all_keys().map_err(|e| e.to_string())?,
            };
            let mut reports = Vec::with_capacity(keys.len());
            for k in &keys {
                reports
                    .push(report::stored_usage(&store, k, month, now).map_err(|e| e.to_string())?);
            }
            if json {
                print_json(&if id.is_some() {
                    reports.remove(0)
                } else {
                    json!(reports)
                });
            } else {
                for r in &reports {
                    // "$2.000000 hard", or "none": the figure as the spend is shown.
                    let budget = match r["budget_usd"].as_f64().and_then(Nanos::from_usd) {
                        Some(cap) => {
                            format!("${cap} {}", r["budget_mode"].as_str().unwrap_or(""))
                        }
                        None => "none".to_string(),
                    };
                    println!(
                        "{} ({}) {}: {} spent, budget {budget}",
                        r["key_id"].as_str().unwrap_or(""),
                        r["name"].as_str().unwrap_or(""),
                        r["month"].as_str().unwrap_or(""),
                        r["spend_display"].as_str().unwrap_or(""),
                    );
                    if let Some(models) = r["by_model"].as_object() {
                        for (m, v) in models {
                            println!(
                                "  {m:<30} {:>8} req {:>10} in {:>10} out  ${}",
                                v["requests"],
                                v["prompt_tokens"],
                                v["completion_tokens"],
                                Nanos::new(v["spend_nanodollars"].as_i64().unwrap_or(0))
                            );
                        }
                    }
                }
            }
            Ok(())
        }
        Command::Traces { key, limit, json } => {
            listing_limit(limit)?;
            // An unknown key is an error, as `GET /admin/traces?key=` answers 404.
            if let Some(id) = key.as_deref() {
                found(id, store.get_key(id))?;
            }
            let rows = store
                .traces(key.as_deref(), limit, None)
                .map_err(|e| e.to_string())?;
            if json {
                print_json(&json!(rows
                    .iter()
                    .map(report::trace_json)
                    .collect::<Vec<_>>()));
            } else {
                println!(
                    "{:<20} {:<22} {:<17} {:<34} {:<12} {:>6} {:<26} {:>7} {:>7} {:>7} {:>7}  COST",
                    "TIME",
                    "KEY",
                    "ENDPOINT",
                    "MODEL (ASKED -> SERVED)",
                    "PROVIDER",
                    "STATUS",
                    "ERROR",
                    "MS",
                    "TTFB",
                    "IN",
                    "OUT"
                );
                for t in &rows {
                    // As the dashboard shows it: an alias and the model that served it.
                    let model = match (t.requested_model.as_deref(), t.served_model.as_deref()) {
                        (Some(asked), Some(served)) if asked != served => {
                            format!("{asked} -> {served}")
                        }
                        (asked, served) => served.or(asked).unwrap_or("-").to_string(),
                    };
                    println!(
                        "{:<20} {:<22} {:<17} {:<34} {:<12} {:>6} {:<26} {:>7} {:>7} {:>7} {:>7}  ${}",
                        rfc3339(t.ts),
                        t.key_id.as_deref().unwrap_or("-"),
                        t.endpoint,
                        model,
                        t.provider.as_deref().unwrap_or("-"),
                        t.status,
                        t.error_code.as_deref().unwrap_or("-"),
                        t.latency_ms,
                        t.ttfb_ms.map_or("-".to_string(), |ms| ms.to_string()),
                        t.prompt_tokens,
                        t.completion_tokens,
                        t.cost
                    );
                }
            }
            Ok(())
        }
        Command::Audit { limit, json } => {
            listing_limit(limit)?;
            let rows = store.audit(limit, None).map_err(|e| e.to_string())?;
            if json {
                print_json(&json!(rows
                    .iter()
                    .map(spidergate::audit::entry_json)
                    .collect::<Vec<_>>()));
            } else {
                println!(
                    "{:<20} {:<10} {:<32} {:<22} TARGET",
                    "TIME", "DOOR", "ACTOR", "ACTION"
                );
                for e in &rows {
                    println!(
                        "{:<20} {:<10} {:<32} {:<22} {}",
                        rfc3339(e.ts),
                        e.door,
                        e.actor,
                        e.action,
                        e.target
                    );
                }
            }
            Ok(())
        }
        Command::Serve(_) | Command::CheckConfig | Command::Prices(_) => Ok(()),
    }
}

/// `prices import`: plans the edit (validated as `check-config` validates), prints the diff,
/// and unless `dry_run` writes the config file in place.
fn prices_import(
    config_path: &std::path::Path,
    file: &std::path::Path,
    dry_run: bool,
    json: bool,
) -> CliResult {
    let config_text = std::fs::read_to_string(config_path)
        .map_err(|e| format!("{}: {e}", config_path.display()))?;
    let price_map =
        std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let plan = spidergate::prices::plan(&config_text, config_path, &price_map)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let write = !dry_run && !plan.changes.is_empty();
    if write {
        spidergate::prices::write_in_place(config_path, &plan.text)
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        // The audit log lives in the config's store; the file is already written, so a store
        // that cannot be opened is reported, not fatal.
        let changes = |old: bool| {
            json!(plan
                .changes
                .iter()
                .map(|c| json!({
                    "model": c.model,
                    "field": c.field,
                    "value": if old { json!(c.old) } else { json!(c.new) },
                }))
                .collect::<Vec<_>>())
        };
        match Config::parse(&plan.text, config_path)
            .map_err(|e| e.to_string())
            .and_then(|c| open(&c))
        {
            Ok(mut store) => spidergate::audit::record(
                &mut store,
                &Actor::cli(),
                "prices.import",
                &config_path.display().to_string(),
                Some(changes(true)),
                Some(changes(false)),
                now_ms(),
            ),
            Err(e) => eprintln!("warning: the price import was not recorded in the audit log: {e}"),
        }
    }
    if json {
        print_json(&json!({
            "config": config_path.display().to_string(),
            "dry_run": dry_run,
            "written": write,
            "matched": plan.matched,
            "unmatched": plan.unmatched,
            "changes": plan.changes.iter().map(|c| json!({
                "model": c.model, "field": c.field, "old": c.old, "new": c.new,
            })).collect::<Vec<_>>(),
            "diff": plan.diff,
        }));
        return Ok(());
    }
    print!("{}", plan.diff);
    println!(
        "{} of {} models matched; {} fields {}",
        plan.matched.len(),
        plan.matched.len() + plan.unmatched.len(),
        plan.changes.len(),
        if dry_run { "would change" } else { "changed" }
    );
    for u in &plan.unmatched {
        println!("unmatched: {u}");
    }
    if dry_run {
        println!("dry run: {} not written", config_path.display());
    } else if write {
        println!(
            "wrote {}; a running gateway applies it on SIGHUP",
            config_path.display()
        );
    } else {
        println!("{} is already up to date", config_path.display());
    }
    Ok(())
}

fn print_human(v: &serde_json::Value) {
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            let shown = match val {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => "-".into(),
                other => other.to_string(),
            };
            println!("{k:>20}: {shown}");
        }
    }
}

/// `--limit` of a listing: 1 to 10,000 rows, as the admin API's `limit` takes.
fn listing_limit(limit: u32) -> Result<(), String> {
    if (1..=10_000).contains(&limit) {
        Ok(())
    } else {
        Err(format!("--limit must be between 1 and 10000 (got {limit})"))
    }
}

#[cfg(test)]
mod tests {
    use super::bare_free_only;

    fn argv(s: &str) -> Vec<std::ffi::OsString> {
        s.split(' ').map(Into::into).collect()
    }

    #[test]
    fn a_bare_free_only_on_keys_update_is_a_switch_in_any_position() {
        for (given, wanted) in [
            (
                "sg keys update ID --free-only",
                "sg keys update ID --free-only=true",
            ),
            (
                "sg keys update --free-only ID",
                "sg keys update --free-only=true ID",
            ),
            (
                "sg --config c.yaml keys update --free-only ID --rpm 5",
                "sg --config c.yaml keys update --free-only=true ID --rpm 5",
            ),
            (
                "sg keys update ID --free-only false",
                "sg keys update ID --free-only false",
            ),
            (
                "sg keys update --free-only true ID",
                "sg keys update --free-only true ID",
            ),
            // Not `keys update`: `create` takes a plain switch, left as it is.
            (
                "sg keys create --free-only --name a",
                "sg keys create --free-only --name a",
            ),
        ] {
            assert_eq!(bare_free_only(argv(given)), argv(wanted), "{given}");
        }
    }
}
