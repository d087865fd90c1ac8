#!/usr/bin/env node
// Compiles contracts/src/*.sol with solc-js (optimizer on) and writes one JSON artifact per
// contract (ABI + bytecode) to src/prime/chain/artifacts/, or to the folder given as argument.
// The output is deterministic: the same sources and lockfile give byte-identical files, which
// tests/chain/test_artifacts.py checks against the committed artifacts.
//
//   node build.mjs [OUT_DIR]        (npm run build)

import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);
const solc = require("solc");

const here = path.dirname(fileURLToPath(import.meta.url));
const srcDir = path.join(here, "src");
const outDir = path.resolve(process.argv[2] ?? path.join(here, "..", "src", "prime", "chain", "artifacts"));

// Contracts whose artifacts the Python package loads.
const CONTRACTS = ["PrimeRegistry"];

// cancun runs on Arbitrum and on every anvil hardfork since; pinning it keeps the bytecode
// independent of the compiler's default EVM version.
const SETTINGS = {
  optimizer: { enabled: true, runs: 200 },
  evmVersion: "cancun",
  outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
};

function findImport(importPath) {
  for (const base of [here, path.join(here, "node_modules")]) {
    const candidate = path.join(base, importPath);
    if (fs.existsSync(candidate)) return { contents: fs.readFileSync(candidate, "utf8") };
  }
  return { error: `File not found: ${importPath} (run \`npm ci\` in contracts/)` };
}

const sources = {};
for (const file of fs.readdirSync(srcDir).filter((f) => f.endsWith(".sol")).sort()) {
  sources[`src/${file}`] = { content: fs.readFileSync(path.join(srcDir, file), "utf8") };
}

const input = { language: "Solidity", sources, settings: SETTINGS };
const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImport }));

const problems = (output.errors ?? []).filter((e) => e.severity === "error");
for (const e of output.errors ?? []) console.error(e.formattedMessage);
if (problems.length > 0) process.exit(1);

fs.mkdirSync(outDir, { recursive: true });
for (const name of CONTRACTS) {
  const sourceName = `src/${name}.sol`;
  const compiled = output.contracts?.[sourceName]?.[name];
  if (!compiled) {
    console.error(`Contract ${name} not found in ${sourceName}`);
    process.exit(1);
  }
  const artifact = {
    contractName: name,
    sourceName,
    compiler: { version: solc.version(), settings: { optimizer: SETTINGS.optimizer, evmVersion: SETTINGS.evmVersion } },
    abi: compiled.abi,
    bytecode: "0x" + compiled.evm.bytecode.object,
    deployedBytecode: "0x" + compiled.evm.deployedBytecode.object,
  };
  const target = path.join(outDir, `${name}.json`);
  fs.writeFileSync(target, JSON.stringify(artifact, null, 2) + "\n");
  console.log(`wrote ${path.relative(process.cwd(), target)} (${compiled.evm.deployedBytecode.object.length / 2} bytes deployed)`);
}
