// DynASyn LLM Settings' model picker: for each endpoint, set it, press "list the server's models" and, when a menu
// of models opens, click that endpoint's pick in it (a real click on the menu entry); returns what the node showed and holds,
// and what the saved workflow and the prompt keep of the button (nothing).
const { buildGraph } = require("./graph.cjs");

module.exports = async (page, { endpoints, picks }) => {
  const ids = await page.evaluate(buildGraph, { nodes: [{ id: 1, type: "DynASynLLMSettings", pos: [100, 100] }] });
  const results = [];
  for (const [k, endpoint] of endpoints.entries()) {
    await page.evaluate(({ id, endpoint }) => {
      const node = window.app.graph.getNodeById(id);
      node.widgets.find((w) => w.name === "endpoint").value = endpoint;
      node.widgets.find((w) => w.name === "model").value = "typed-by-hand";
      node.widgets.find((w) => w.type === "button").callback();
    }, { id: ids[1], endpoint });
    await page.waitForFunction((id) => !window.app.graph.getNodeById(id).dynasynModels?.pending, ids[1], { timeout: 60000 });
    const state = await page.evaluate((id) => window.app.graph.getNodeById(id).dynasynModels, ids[1]);
    let menu = [];
    if (state.models) {
      const entries = page.locator(".litecontextmenu .litemenu-entry");
      await entries.first().waitFor({ timeout: 10000 });
      menu = await entries.allTextContents();
      await entries.filter({ hasText: picks[k] }).first().click();
    }
    const model = await page.evaluate((id) => window.app.graph.getNodeById(id).widgets.find((w) => w.name === "model").value, ids[1]);
    results.push({ endpoint, ...state, menu, model });
  }
  const saved = await page.evaluate(async (id) => {
    const node = window.app.graph.serialize().nodes.find((n) => n.id === id);
    const { output } = await window.app.graphToPrompt();
    return { widgets: node.widgets_values, inputs: Object.keys(output[String(id)].inputs) };
  }, ids[1]);
  const xss = await page.evaluate(() => window.__dynasynXss ?? null);  // set only if a model name ran as HTML
  return { results, saved, xss };
};
