#!/usr/bin/env node
// A Node.js client of Shoal, built from protos/ at run time (@grpc/proto-loader), no
// generated code. It signs in, creates a table, inserts records, searches them and reads
// the node's replication status, printing one JSON line per step.
//
//   SHOAL_USERNAME=admin SHOAL_PASSWORD=... node shoal-client.js \
//     --storage 127.0.0.1:9926 --admin 127.0.0.1:9925 --ca data/node1/keys/ca.crt
//
// --ca names the CA certificate (PEM) the node's certificate is signed by: the client
// then speaks TLS and checks that the server's certificate names the host it dials.
// Without --ca it speaks plaintext (a node whose client ports do not serve TLS).
// A failed call prints `shoal-client: CODE: message` on stderr and exits with the gRPC
// status code (3 INVALID_ARGUMENT, 14 UNAVAILABLE, 16 UNAUTHENTICATED, ...).
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', '..', 'protos');
const DEADLINE_MS = 30_000;

// grpc-js sends the dialed host as the TLS server name even when it is an IP address, and
// Node warns about that (DEP0123) on stderr. The certificate is still checked against
// the address, so only that one warning is silenced.
const emitWarning = process.emitWarning.bind(process);
process.emitWarning = (warning, ...rest) => {
  const code = typeof rest[0] === 'object' && rest[0] !== null ? rest[0].code : rest[1];
  if (code !== 'DEP0123') emitWarning(warning, ...rest);
};

function loadServices() {
  const definition = protoLoader.loadSync(
    ['shoal/storage/v1/storage.proto', 'shoal/admin/v1/admin.proto'],
    {
      includeDirs: [PROTOS],
      keepCase: true, // field names exactly as in the .proto files
      longs: String, // uint64 versions do not fit a JavaScript number
      enums: String,
      defaults: true,
      oneofs: true,
    },
  );
  const loaded = grpc.loadPackageDefinition(definition);
  return {
    Storage: loaded.shoal.storage.v1.StorageService,
    Admin: loaded.shoal.admin.v1.AdminService,
  };
}

function credentials(caFile) {
  if (!caFile) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(fs.readFileSync(caFile));
}

function signedIn(username, password) {
  const metadata = new grpc.Metadata();
  const token = Buffer.from(`${username}:${password}`, 'utf8').toString('base64');
  metadata.set('authorization', `Basic ${token}`);
  return metadata;
}

function deadline() {
  return new Date(Date.now() + DEADLINE_MS);
}

// A unary call as a promise.
function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: deadline() }, (error, reply) =>
      error ? reject(error) : resolve(reply),
    );
  });
}

// A server-streaming call, collected.
function collect(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    const replies = [];
    const call = client[method](request, metadata, { deadline: deadline() });
    call.on('data', (reply) => replies.push(reply));
    call.on('error', reject);
    call.on('end', () => resolve(replies));
  });
}

const json = (value) => Buffer.from(JSON.stringify(value), 'utf8');
const parse = (bytes) => JSON.parse(Buffer.from(bytes).toString('utf8'));
const report = (step, fields) => process.stdout.write(`${JSON.stringify({ step, ...fields })}\n`);

async function main() {
  const { values } = parseArgs({
    options: {
      storage: { type: 'string', default: '127.0.0.1:9926' },
      admin: { type: 'string', default: '127.0.0.1:9925' },
      ca: { type: 'string' },
      database: { type: 'string', default: 'dev' },
      table: { type: 'string', default: 'dog' },
    },
  });
  const username = process.env.SHOAL_USERNAME || 'admin';
  const password = process.env.SHOAL_PASSWORD;
  if (!password) {
    process.stderr.write('shoal-client: set SHOAL_PASSWORD (and SHOAL_USERNAME)\n');
    return 2;
  }
  const { Storage, Admin } = loadServices();
  const creds = credentials(values.ca);
  const storage = new Storage(values.storage, creds);
  const admin = new Admin(values.admin, creds);
  const metadata = signedIn(username, password);
  const { database, table } = values;
  try {
    const me = await unary(storage, 'Authenticate', {}, metadata);
    report('authenticate', { username: me.username, role: me.role, super_user: me.super_user });

    const created = await unary(
      storage,
      'CreateTable',
      { database, table, primary_key: 'id', indexed_attributes: ['breed'] },
      metadata,
    );
    report('create_table', { database: created.table.database, table: created.table.name });

    const dogs = [
      { id: 1, name: 'Penny', breed: 'pug' },
      { id: 2, name: 'Harper', breed: 'husky' },
      { id: 3, name: 'Otto', breed: 'pug' },
    ];
    const inserted = await unary(
      storage,
      'Insert',
      { database, table, records: dogs.map(json) },
      metadata,
    );
    report('insert', { inserted: inserted.inserted_ids.map(parse), version: inserted.version });

    const found = await collect(
      storage,
      'SearchByValue',
      { database, table, attribute: 'breed', value: json('pu*') },
      metadata,
    );
    const records = found.flatMap((reply) => reply.records.map(parse));
    report('search', { attribute: 'breed', value: 'pu*', records });

    const status = await unary(admin, 'ClusterStatus', {}, metadata);
    report('cluster_status', {
      node_name: status.node_name,
      is_enabled: status.is_enabled,
      connections: status.connections.map((c) => ({ peer: c.peer, connected: c.connected })),
    });
    return 0;
  } finally {
    storage.close();
    admin.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    const code = typeof error.code === 'number' ? error.code : 1;
    const name = Object.keys(grpc.status).find((key) => grpc.status[key] === code) || 'ERROR';
    process.stderr.write(`shoal-client: ${name}: ${error.details || error.message}\n`);
    process.exitCode = code || 1;
  },
);
