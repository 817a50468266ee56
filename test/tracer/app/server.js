'use strict'
// The demo application of apm-csi's end-to-end tests: a plain Node.js HTTP server. It has no
// tracer of its own and never requires one: when its namespace is labelled for single step
// instrumentation, the apm-csi webhook gives the pod a CSI volume with Datadog's JavaScript
// tracer at /datadog-lib and NODE_OPTIONS=--require=/datadog-lib/node_modules/dd-trace/init.
//
//   GET /         answers after calling /backend over HTTP (a trace with a client span)
//   GET /backend  answers {"answer": 42}
//   GET /tracer   reports whether, and from where, dd-trace was loaded
//   GET /healthz  readiness
const http = require('http')

const port = Number(process.env.PORT || 8080)

function tracerInfo () {
  const files = Object.keys(require.cache).filter((f) => f.includes('/node_modules/dd-trace/'))
  const pkg = files.find((f) => f.endsWith('/node_modules/dd-trace/package.json'))
  let version = ''
  if (pkg) version = require.cache[pkg].exports.version
  return {
    loaded: Boolean(global._ddtrace),
    from: files.length ? files[0].slice(0, files[0].indexOf('/node_modules/dd-trace/') + '/node_modules/dd-trace'.length) : '',
    version,
    nodeOptions: process.env.NODE_OPTIONS || '',
    node: process.version
  }
}

function json (res, status, body) {
  res.statusCode = status
  res.setHeader('content-type', 'application/json')
  res.end(JSON.stringify(body) + '\n')
}

const server = http.createServer((req, res) => {
  switch (req.url) {
    case '/healthz':
      res.end('ok\n')
      return
    case '/backend':
      json(res, 200, { answer: 42 })
      return
    case '/tracer':
      json(res, 200, tracerInfo())
      return
    case '/':
      http.get({ host: '127.0.0.1', port, path: '/backend' }, (r) => {
        let body = ''
        r.setEncoding('utf8')
        r.on('data', (chunk) => { body += chunk })
        r.on('end', () => json(res, 200, { service: process.env.DD_SERVICE || '', backend: JSON.parse(body) }))
      }).on('error', (err) => json(res, 502, { error: String(err) }))
      return
    default:
      json(res, 404, { error: 'not found' })
  }
})

server.listen(port, () => {
  const t = tracerInfo()
  console.log(`listening on :${port}; node ${t.node}; tracer ${t.loaded ? `dd-trace ${t.version} from ${t.from}` : 'not loaded'}`)
})

process.on('SIGTERM', () => server.close(() => process.exit(0)))
