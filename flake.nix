{
  description = "binplz: any program in a Nix binary cache, served as one verified, curl-able static binary";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  # Everything below `lib` is plain data and needs no Nixpkgs, so the tests can read it with
  # Nix alone (`(import ./flake.nix).outputs { … }).lib`). The NixOS module turns each
  # option into its flag through these tables and nothing else: the tests check every flag
  # against `binplz <command> --help`, in both directions.
  outputs = { self, nixpkgs, ... }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # One row per command-line option: the NixOS option `name`, its `flag`, its `type`
      # (str, int, bool, listOfStr, nullOrStr, nullOrInt, enum), its `default` (null: the
      # binary's own default, see `binplz <command> --help`) and its description. A bool
      # passes its flag when true; `invert` passes it when false; a list repeats it.
      flags = {
        serve = [
          { name = "listen"; flag = "--listen"; type = "str"; default = "127.0.0.1:8080"; description = "Address to listen on."; }
          { name = "upstreams"; flag = "--upstream"; type = "listOfStr"; default = [ "https://cache.nixos.org" ]; description = "Binary caches to fetch from, tried in order: http(s)://, file:// or s3://."; }
          { name = "trustedPublicKeys"; flag = "--trusted-public-key"; type = "listOfStr"; default = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ]; description = "Public keys whose signatures are trusted (NAME:BASE64)."; }
          { name = "requireSigs"; flag = "--no-require-sigs"; type = "bool"; invert = true; default = true; description = "Require a valid trusted signature on every narinfo (NarHash is checked either way)."; }
          { name = "indexes"; flag = "--index"; type = "listOfStr"; default = [ ]; description = "Index files (one per Nixpkgs revision). Empty with services.binplz.index enabled: the index job's files."; }
          { name = "maxIndexSize"; flag = "--max-index-size"; type = "nullOrStr"; default = null; description = "Largest index file read (bytes; K, M, G suffixes)."; }
          { name = "diskCacheSize"; flag = "--disk-cache-size"; type = "str"; default = "10G"; description = "Disk cache size (bytes; K, M, G, T suffixes)."; }
          { name = "memoryCacheSize"; flag = "--memory-cache-size"; type = "int"; default = 268435456; description = "Memory cache size in bytes; the unit's MemoryMax follows from it."; }
          { name = "maxFileSize"; flag = "--max-file-size"; type = "nullOrStr"; default = null; description = "Largest file served."; }
          { name = "defaultSystem"; flag = "--default-system"; type = "nullOrStr"; default = null; description = "System for requests that name none."; }
          { name = "maxUpstreamFetches"; flag = "--max-upstream-fetches"; type = "nullOrInt"; default = null; description = "Upstream extractions at once."; }
          { name = "upstreamQueueTimeout"; flag = "--upstream-queue-timeout"; type = "nullOrStr"; default = null; description = "Longest a request waits for an upstream fetch slot (e.g. 10s)."; }
          { name = "upstreamNarinfoTimeout"; flag = "--upstream-narinfo-timeout"; type = "nullOrStr"; default = null; description = "Longest a narinfo fetch may take, retries included."; }
          { name = "upstreamMinRate"; flag = "--upstream-min-rate"; type = "nullOrStr"; default = null; description = "Least average rate of a NAR download (bytes per second)."; }
          { name = "upstreamRateWindow"; flag = "--upstream-rate-window"; type = "nullOrStr"; default = null; description = "Window over which upstreamMinRate is averaged."; }
          { name = "upstreamNarTimeout"; flag = "--upstream-nar-timeout"; type = "nullOrStr"; default = null; description = "Longest a NAR download may take, besides its size at upstreamMinRate."; }
          { name = "maxPerClient"; flag = "--max-per-client"; type = "nullOrInt"; default = null; description = "Requests in progress per client address."; }
          { name = "shutdownGrace"; flag = "--shutdown-grace"; type = "nullOrInt"; default = null; description = "Seconds to finish responses in progress at stop."; }
          { name = "threads"; flag = "--threads"; type = "nullOrInt"; default = null; description = "Threads serving connections (default: the number of CPUs)."; }
          { name = "diskScrubPeriod"; flag = "--disk-scrub-period"; type = "nullOrInt"; default = null; description = "Seconds the scrubber takes to re-hash the disk cache once (0: none)."; }
          { name = "builderTimeout"; flag = "--builder-timeout"; type = "nullOrStr"; default = null; description = "Longest a question to the builder may take (e.g. 5s)."; }
          { name = "builderAnswerTtl"; flag = "--builder-answer-ttl"; type = "nullOrStr"; default = null; description = "How long the builder's answer about a derivation is kept."; }
          { name = "builderRetryAfter"; flag = "--builder-retry-after"; type = "nullOrStr"; default = null; description = "The Retry-After sent while a program is being built."; }
          { name = "builderPublicUrl"; flag = "--builder-public-url"; type = "nullOrStr"; default = null; description = "The builder's address as users reach it, for links to build logs (default: the builder URL)."; }
          { name = "priority"; flag = "--priority"; type = "nullOrInt"; default = null; description = "Priority announced in nix-cache-info to Nix clients (lower is preferred)."; }
          { name = "logFormat"; flag = "--log-format"; type = "enum"; values = [ "text" "json" ]; default = "json"; description = "Log format."; }
        ];

        builder = [
          { name = "listen"; flag = "--listen"; type = "str"; default = "127.0.0.1:8081"; description = "Address of the builder's API and operator page."; }
          { name = "indexes"; flag = "--index"; type = "listOfStr"; default = [ ]; description = "Index files naming the derivations this builder may build. Empty with services.binplz.index enabled: the index job's files."; }
          { name = "maxIndexSize"; flag = "--max-index-size"; type = "nullOrStr"; default = null; description = "Largest index file read (bytes; K, M, G suffixes)."; }
          { name = "indexPoll"; flag = "--index-poll"; type = "nullOrStr"; default = null; description = "How often index files are checked for changes (e.g. 30s)."; }
          { name = "storeUri"; flag = "--store-uri"; type = "str"; default = "file:///var/lib/binplz-builder/cache"; description = "Where built outputs are published, narinfo last: file:///DIR or s3://BUCKET?region=…"; }
          { name = "maxParallel"; flag = "--max-parallel"; type = "nullOrInt"; default = null; description = "Builds at once."; }
          { name = "timeout"; flag = "--timeout"; type = "nullOrStr"; default = null; description = "Longest a build may run (e.g. 120m)."; }
          { name = "maxSilentTime"; flag = "--max-silent-time"; type = "nullOrStr"; default = null; description = "Longest a build may print nothing (e.g. 30m)."; }
          { name = "maxLogSize"; flag = "--max-log-size"; type = "nullOrStr"; default = null; description = "Most log a build may write (bytes; K, M, G suffixes)."; }
          { name = "maxNarSize"; flag = "--max-nar-size"; type = "nullOrStr"; default = null; description = "Largest NAR an output may have; a larger one is not uploaded."; }
          { name = "cores"; flag = "--cores"; type = "nullOrInt"; default = null; description = "CPU cores one build may use (0: all)."; }
          { name = "monthlyBudget"; flag = "--monthly-budget"; type = "nullOrInt"; default = null; description = "Build hours per calendar month (UTC)."; }
          { name = "perClientBuilds"; flag = "--per-client-builds"; type = "nullOrInt"; default = null; description = "New builds one client address may start an hour."; }
          { name = "retryDelay"; flag = "--retry-delay"; type = "nullOrStr"; default = null; description = "Delay before the first retry of a transient failure (then ×3 each time)."; }
        ];

        index = [
          { name = "upstreams"; flag = "--upstream"; type = "listOfStr"; default = [ "https://cache.nixos.org" ]; description = "Binary caches whose listings the index is built from."; }
          { name = "trustedPublicKeys"; flag = "--trusted-public-key"; type = "listOfStr"; default = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ]; description = "Public keys whose signatures are trusted."; }
          { name = "jobs"; flag = "--jobs"; type = "nullOrInt"; default = null; description = "Store paths scanned at once."; }
        ];
      };

      # Flags the module sets itself, never from a table row: the files systemd manages.
      managedFlags = {
        serve = [ "--cache-dir" "--sign-key-file" "--builder" ];
        builder = [ "--state-dir" "--secret-key-file" "--operator-token-file" ];
        index = [ "--eval" "--output" "--revision" ];
      };

      # Turns a table and an attribute set of values into the argument list.
      toArgs = table: cfg:
        builtins.concatLists (map
          (row:
            let v = cfg.${row.name}; in
            if v == null then [ ]
            else if builtins.isList v then builtins.concatLists (map (x: [ row.flag (toString x) ]) v)
            else if builtins.isBool v then (if (v != (row.invert or false)) then [ row.flag ] else [ ])
            else [ row.flag (toString v) ])
          table);
    in
    {
      lib = { inherit flags managedFlags toArgs; };

      packages = forAllSystems (pkgs:
        let
          package = rustPlatform: rustPlatform.buildRustPackage {
            pname = "binplz";
            version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package.version;
            src = self;
            cargoLock.lockFile = ./Cargo.lock;
            nativeBuildInputs = [ pkgs.pkg-config ];
            # The integration tests start Nix, Chromium and an S3 server; the build sandbox
            # has none of them, so the check phase runs the unit tests.
            cargoTestFlags = [ "--lib" ];
            meta = {
              description = "Serve any program in a Nix binary cache as a verified, curl-able static binary";
              license = pkgs.lib.licenses.mit;
              mainProgram = "binplz";
            };
          };
        in
        {
          default = package pkgs.rustPlatform;
          # binplz itself as one static (musl) binary.
          static = package pkgs.pkgsStatic.rustPlatform;
        });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo rustc clippy rustfmt rust-analyzer pkg-config
            nix zstd xz nginx wrk hyperfine chromium chromedriver curl
            pkgsStatic.busybox sqlite
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style);

      nixosModules.default = { config, lib, pkgs, ... }:
        let
          cfg = config.services.binplz;
          package = cfg.package;

          optionOf = row:
            let
              t = lib.types;
              type = {
                str = t.str;
                int = t.int;
                bool = t.bool;
                listOfStr = t.listOf t.str;
                nullOrStr = t.nullOr t.str;
                nullOrInt = t.nullOr t.int;
                enum = t.enum (row.values or [ ]);
              }.${row.type};
            in
            lib.mkOption { inherit type; inherit (row) default description; };
          optionsOf = table: builtins.listToAttrs (map (row: { inherit (row) name; value = optionOf row; }) table);

          indexDir = "/var/lib/binplz-index";
          # The index job keeps revisions in fixed slots, newest first, so that the edge and
          # the builder name the same files for ever and reload them when they change.
          indexFiles = map (k: "${indexDir}/${if k == 0 then "current" else "previous-${toString k}"}.idx")
            (lib.range 0 (cfg.index.keepRevisions - 1));
          indexesOr = given: if given != [ ] then given else if cfg.index.enable then indexFiles else [ ];

          hardening = {
            NoNewPrivileges = true;
            ProtectSystem = "strict";
            ProtectHome = true;
            PrivateTmp = true;
            PrivateDevices = true;
            ProtectKernelTunables = true;
            ProtectKernelModules = true;
            ProtectKernelLogs = true;
            ProtectControlGroups = true;
            ProtectClock = true;
            ProtectHostname = true;
            RestrictNamespaces = true;
            RestrictRealtime = true;
            RestrictSUIDSGID = true;
            LockPersonality = true;
            MemoryDenyWriteExecute = true;
            RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
            SystemCallArchitectures = "native";
            SystemCallFilter = [ "@system-service" "~@privileged" ];
            CapabilityBoundingSet = "";
            UMask = "0077";
          };

          listenPort = listen: lib.toInt (lib.last (lib.splitString ":" listen));
        in
        {
          options.services.binplz = {
            package = lib.mkOption {
              type = lib.types.package;
              default = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
              defaultText = lib.literalExpression "binplz.packages.\${system}.default";
              description = "The binplz package.";
            };

            edge = optionsOf flags.serve // {
              enable = lib.mkEnableOption "the binplz edge (binplz serve)";
              openFirewall = lib.mkOption { type = lib.types.bool; default = false; description = "Open the listen port in the firewall."; };
              builder = lib.mkOption {
                type = lib.types.nullOr lib.types.str;
                default = if cfg.builder.enable then "http://${cfg.builder.listen}" else null;
                defaultText = lib.literalExpression "the local builder's URL when services.binplz.builder is enabled";
                description = "URL of a binplz builder to ask for programs the index knows but no cache holds.";
              };
              signKeyFile = lib.mkOption {
                type = lib.types.nullOr lib.types.str;
                default = null;
                description = "Path (outside the Nix store) of a Nix secret key: narinfos served to Nix clients also carry this node's signature. Passed with LoadCredential.";
              };
              extraArgs = lib.mkOption { type = lib.types.listOf lib.types.str; default = [ ]; description = "More arguments for binplz serve."; };
            };

            builder = optionsOf flags.builder // {
              enable = lib.mkEnableOption "the binplz builder (binplz builder), which runs Nix";
              secretKeyFile = lib.mkOption {
                type = lib.types.str;
                description = "Path (outside the Nix store) of the key the builder signs outputs with (`nix key generate-secret`). Passed to the unit with LoadCredential.";
              };
              operatorTokenFile = lib.mkOption {
                type = lib.types.nullOr lib.types.str;
                default = null;
                description = "Path (outside the Nix store) of the operator's token; without it the operator page is read-only. Passed with LoadCredential.";
              };
              environmentFile = lib.mkOption {
                type = lib.types.nullOr lib.types.str;
                default = null;
                description = "File of environment variables for the unit, e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for an s3:// store.";
              };
              extraArgs = lib.mkOption { type = lib.types.listOf lib.types.str; default = [ ]; description = "More arguments for binplz builder."; };
            };

            index = optionsOf flags.index // {
              enable = lib.mkEnableOption "the nightly evaluation and index build";
              nixpkgs = lib.mkOption {
                type = lib.types.nullOr lib.types.str;
                default = null;
                example = "https://channels.nixos.org/nixos-unstable/nixexprs.tar.xz";
                description = "The Nixpkgs to evaluate, as a tarball URL (a channel's nixexprs.tar.xz, a GitHub archive). Give this or `flake`.";
              };
              flake = lib.mkOption {
                type = lib.types.nullOr lib.types.str;
                default = null;
                example = "github:NixOS/nixpkgs/nixos-unstable";
                description = "The Nixpkgs to evaluate, as a flake reference (evaluated with nix-eval-jobs --flake). Give this or `nixpkgs`.";
              };
              packageSet = lib.mkOption { type = lib.types.str; default = "pkgsStatic"; description = "The package set evaluated inside Nixpkgs."; };
              systems = lib.mkOption { type = lib.types.listOf lib.types.str; default = [ "x86_64-linux" ]; description = "Systems evaluated, one evaluation each."; };
              keepRevisions = lib.mkOption { type = lib.types.ints.positive; default = 2; description = "Index revisions kept (and served): the newest and the ones before it."; };
              schedule = lib.mkOption { type = lib.types.str; default = "daily"; description = "When the job runs (systemd OnCalendar)."; };
              evalWorkers = lib.mkOption { type = lib.types.ints.positive; default = 2; description = "nix-eval-jobs workers."; };
              evalMemory = lib.mkOption { type = lib.types.ints.positive; default = 4096; description = "nix-eval-jobs --max-memory-size per worker (MiB)."; };
            };
          };

          config = lib.mkMerge [
            (lib.mkIf cfg.edge.enable {
              networking.firewall.allowedTCPPorts = lib.mkIf cfg.edge.openFirewall [ (listenPort cfg.edge.listen) ];
              systemd.services.binplz-edge = {
                description = "binplz edge";
                wantedBy = [ "multi-user.target" ];
                after = [ "network-online.target" ] ++ lib.optional cfg.builder.enable "binplz-builder.service";
                wants = [ "network-online.target" ];
                serviceConfig = hardening // {
                  ExecStart = lib.escapeShellArgs ([ (lib.getExe package) "serve" "--cache-dir" "/var/cache/binplz" ]
                    ++ toArgs flags.serve (cfg.edge // { indexes = indexesOr cfg.edge.indexes; })
                    ++ lib.optionals (cfg.edge.builder != null) [ "--builder" cfg.edge.builder ]
                    ++ lib.optionals (cfg.edge.signKeyFile != null) [ "--sign-key-file" "%d/sign-key" ]
                    ++ cfg.edge.extraArgs);
                  ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
                  DynamicUser = true;
                  CacheDirectory = "binplz";
                  LoadCredential = lib.optional (cfg.edge.signKeyFile != null) "sign-key:${cfg.edge.signKeyFile}";
                  # The index files are read, never written.
                  ReadOnlyPaths = lib.optional cfg.index.enable indexDir;
                  # The memory cache, the loaded indexes and the connections' buffers.
                  MemoryMax = toString (cfg.edge.memoryCacheSize * 2 + 1024 * 1024 * 1024 * (1 + builtins.length (indexesOr cfg.edge.indexes)));
                  Restart = "on-failure";
                  RestartSec = 5;
                  LimitNOFILE = 65536;
                };
              };
            })

            (lib.mkIf cfg.builder.enable {
              users.users.binplz-builder = { isSystemUser = true; group = "binplz-builder"; home = "/var/lib/binplz-builder"; };
              users.groups.binplz-builder = { };
              systemd.services.binplz-builder = {
                description = "binplz builder";
                wantedBy = [ "multi-user.target" ];
                after = [ "network-online.target" "nix-daemon.service" ];
                wants = [ "network-online.target" ];
                # The builder runs Nix: nix-store --realise through the daemon, nix copy.
                path = [ config.nix.package ];
                environment.HOME = "/var/lib/binplz-builder";
                serviceConfig = hardening // {
                  ExecStart = lib.escapeShellArgs ([ (lib.getExe package) "builder"
                    "--state-dir" "/var/lib/binplz-builder"
                    "--secret-key-file" "%d/signing-key" ]
                    ++ lib.optionals (cfg.builder.operatorTokenFile != null) [ "--operator-token-file" "%d/operator-token" ]
                    ++ toArgs flags.builder (cfg.builder // { indexes = indexesOr cfg.builder.indexes; })
                    ++ cfg.builder.extraArgs);
                  ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
                  # A fixed user, not DynamicUser: an edge on the same machine reads the
                  # builder's file:// store, and dynamic users' state is not readable by others.
                  User = "binplz-builder";
                  Group = "binplz-builder";
                  StateDirectory = "binplz-builder";
                  StateDirectoryMode = "0755";
                  UMask = "0022";
                  LoadCredential = [ "signing-key:${cfg.builder.secretKeyFile}" ]
                    ++ lib.optional (cfg.builder.operatorTokenFile != null) "operator-token:${cfg.builder.operatorTokenFile}";
                  EnvironmentFile = lib.mkIf (cfg.builder.environmentFile != null) cfg.builder.environmentFile;
                  ReadOnlyPaths = lib.optional cfg.index.enable indexDir;
                  Restart = "on-failure";
                  RestartSec = 5;
                };
              };
            })

            (lib.mkIf cfg.index.enable {
              systemd.services.binplz-index = {
                description = "binplz nightly evaluation and index build";
                after = [ "network-online.target" "nix-daemon.service" ];
                wants = [ "network-online.target" ];
                path = [ config.nix.package pkgs.nix-eval-jobs pkgs.coreutils pkgs.git ];
                environment.HOME = indexDir;
                # Evaluate each system, build the index, then rotate the slots: each `mv` is
                # atomic, so an edge reloading at any moment sees a whole file.
                script = ''
                  set -euo pipefail
                  work=$(mktemp -d "${indexDir}/work.XXXXXX")
                  trap 'rm -rf "$work"' EXIT
                  evals=()
                  for system in ${lib.escapeShellArgs cfg.index.systems}; do
                    nix-eval-jobs --meta --force-recurse \
                      --workers ${toString cfg.index.evalWorkers} \
                      --max-memory-size ${toString cfg.index.evalMemory} \
                      --gc-roots-dir "$work/gcroots" \
                      ${if cfg.index.flake != null
                        then ''--flake "${cfg.index.flake}#legacyPackages.$system.${cfg.index.packageSet}"''
                        else ''--impure --expr "(import (builtins.fetchTarball \"${cfg.index.nixpkgs}\") { system = \"$system\"; }).${cfg.index.packageSet}"''} \
                      > "$work/eval-$system.jsonl"
                    evals+=(--eval "$work/eval-$system.jsonl")
                  done
                  # The revision: the channel's own, where it says, else the time of the run.
                  rev=${if cfg.index.flake != null
                    then ''$(nix --extra-experimental-features "nix-command flakes" flake metadata --json "${cfg.index.flake}" | ${pkgs.jq}/bin/jq -r '.locked.rev // empty')''
                    else ''$(nix --extra-experimental-features nix-command eval --impure --raw --expr 'let d = builtins.fetchTarball "${cfg.index.nixpkgs}"; in if builtins.pathExists (d + "/.git-revision") then builtins.readFile (d + "/.git-revision") else ""')''}
                  [ -n "$rev" ] || rev=$(date -u +%Y-%m-%dT%H:%M:%SZ)
                  ${lib.getExe package} index build "''${evals[@]}" \
                    ${lib.escapeShellArgs (toArgs flags.index cfg.index)} \
                    --revision "$rev" --output "$work/new.idx"
                  slots=(${lib.escapeShellArgs indexFiles})
                  for ((k = ''${#slots[@]} - 1; k > 0; k--)); do
                    if [ -e "''${slots[k-1]}" ]; then mv -f "''${slots[k-1]}" "''${slots[k]}"; fi
                  done
                  mv -f "$work/new.idx" "''${slots[0]}"
                '';
                serviceConfig = {
                  Type = "oneshot";
                  # A fixed user, not DynamicUser: dynamic users' state lives under
                  # /var/lib/private, which the edge and the builder could not read.
                  User = "binplz-index";
                  Group = "binplz-index";
                  StateDirectory = "binplz-index";
                  StateDirectoryMode = "0755";
                  UMask = "0022";
                  NoNewPrivileges = true;
                  ProtectSystem = "strict";
                  ProtectHome = true;
                  PrivateTmp = true;
                };
              };
              assertions = [{
                assertion = (cfg.index.nixpkgs == null) != (cfg.index.flake == null);
                message = "services.binplz.index: set exactly one of nixpkgs (a tarball URL) and flake (a flake reference).";
              }];
              users.users.binplz-index = { isSystemUser = true; group = "binplz-index"; home = indexDir; };
              users.groups.binplz-index = { };
              systemd.timers.binplz-index = {
                wantedBy = [ "timers.target" ];
                timerConfig = { OnCalendar = cfg.index.schedule; Persistent = true; RandomizedDelaySec = "30m"; };
              };
            })
          ];
        };

      checks = forAllSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        # An edge, a builder and a client, on a cache and an evaluation from fixtures/
        # (no network in the VM). Needs KVM.
        vm = pkgs.testers.runNixOSTest {
          name = "binplz";
          nodes.server = { ... }: {
            imports = [ self.nixosModules.default ];
            environment.etc."binplz/signing-key".source = ./fixtures/keys/binplz-test-1.secret;
            services.binplz.builder = {
              enable = true;
              secretKeyFile = "/etc/binplz/signing-key";
              indexes = [ "/var/lib/binplz-fixtures/index" ];
            };
            services.binplz.edge = {
              enable = true;
              listen = "0.0.0.0:8080";
              openFirewall = true;
              upstreams = [ "file://${./fixtures/cache}" ];
              trustedPublicKeys = [ (builtins.readFile ./fixtures/keys/binplz-test-1.public) ];
              indexes = [ "/var/lib/binplz-fixtures/index" ];
            };
            systemd.services.binplz-fixtures-index = {
              wantedBy = [ "multi-user.target" ];
              before = [ "binplz-edge.service" "binplz-builder.service" ];
              serviceConfig = { Type = "oneshot"; StateDirectory = "binplz-fixtures"; };
              script = ''
                ${pkgs.lib.getExe self.packages.${pkgs.stdenv.hostPlatform.system}.default} index build \
                  --eval ${./fixtures/eval/nix-env.json} --upstream file://${./fixtures/cache} \
                  --trusted-public-key "$(cat ${./fixtures/keys/binplz-test-1.public})" \
                  --output /var/lib/binplz-fixtures/index
              '';
            };
          };
          nodes.client = { pkgs, ... }: { environment.systemPackages = [ pkgs.curl ]; };
          testScript = ''
            start_all()
            server.wait_for_unit("binplz-edge.service")
            server.wait_for_unit("binplz-builder.service")
            server.wait_for_open_port(8080)
            client.succeed("curl -fsSL http://server:8080/hello -o /tmp/hello && chmod +x /tmp/hello && /tmp/hello")
            server.succeed("curl -fsS http://127.0.0.1:8081/-/healthz")
            server.succeed("systemctl reload binplz-edge.service")
            client.succeed("curl -fsSL http://server:8080/hello -o /dev/null")
          '';
        };
      });
    };
}
