// Module resolution hook for rpc_server.mjs: @anycable/serverless-js 0.1.0 ships ES modules
// whose relative imports have no file extension ('./rpc', '../channel'), which Node's ESM
// loader refuses. For relative specifiers inside that package only, retry as
// '<specifier>/index.js', then '<specifier>.js'.

const PACKAGE = '/@anycable/serverless-js/'

export async function resolve(specifier, context, nextResolve) {
  try {
    return await nextResolve(specifier, context)
  } catch (error) {
    const inPackage = context.parentURL && context.parentURL.includes(PACKAGE)
    if (!inPackage || !specifier.startsWith('.')) throw error
    for (const candidate of [`${specifier}/index.js`, `${specifier}.js`]) {
      try {
        return await nextResolve(candidate, context)
      } catch {
        // try the next form
      }
    }
    throw error
  }
}
